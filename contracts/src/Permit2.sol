// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {ISignatureTransfer} from "./interfaces/ISignatureTransfer.sol";
import {SignatureVerification} from "./lib/SignatureVerification.sol";

/// @notice Permit2's shared errors (Uniswap `permit2` src/PermitErrors.sol).
error SignatureExpired(uint256 signatureDeadline);
error InvalidNonce();

/// @title Permit2 (SignatureTransfer only)
/// @notice A devnet re-implementation of the SignatureTransfer part of Uniswap Permit2, for the
///         canonical address 0x000000000022D473030F116dDEE9F6B43aC78BA3: single and batch
///         `permitTransferFrom` / `permitWitnessTransferFrom`, unordered nonces (`nonceBitmap`,
///         `invalidateUnorderedNonces`), Uniswap's EIP-712 domain, type strings, check order and
///         custom errors. The AllowanceTransfer half (`approve`, `permit`, `transferFrom`,
///         `allowance`, `lockdown`) is not implemented.
/// @dev setCode-friendly: no constructor, no immutables (the real contract caches its domain
///      separator in immutables; here it is recomputed on every call from block.chainid and
///      address(this), which gives the same value). The spender is not a parameter: as in
///      Uniswap's PermitHash, `msg.sender` is hashed in as `spender`, so a call by anyone other
///      than the signed spender fails signature verification (`InvalidSigner` for an EOA owner).
///      Tokens move with ERC-20 `transferFrom(owner, to, amount)` under solmate SafeTransferLib
///      rules: any failure (revert, `false`, or a return value other than exactly 1) becomes
///      `revert("TRANSFER_FROM_FAILED")`.
contract Permit2 is ISignatureTransfer {
    using SignatureVerification for bytes;

    bytes32 private constant _TYPE_HASH =
        keccak256("EIP712Domain(string name,uint256 chainId,address verifyingContract)");
    bytes32 private constant _HASHED_NAME = keccak256("Permit2");

    bytes32 private constant _TOKEN_PERMISSIONS_TYPEHASH = keccak256("TokenPermissions(address token,uint256 amount)");
    bytes32 private constant _PERMIT_TRANSFER_FROM_TYPEHASH = keccak256(
        "PermitTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline)TokenPermissions(address token,uint256 amount)"
    );
    bytes32 private constant _PERMIT_BATCH_TRANSFER_FROM_TYPEHASH = keccak256(
        "PermitBatchTransferFrom(TokenPermissions[] permitted,address spender,uint256 nonce,uint256 deadline)TokenPermissions(address token,uint256 amount)"
    );
    string private constant _PERMIT_TRANSFER_FROM_WITNESS_TYPEHASH_STUB =
        "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,";
    string private constant _PERMIT_BATCH_WITNESS_TRANSFER_FROM_TYPEHASH_STUB =
        "PermitBatchWitnessTransferFrom(TokenPermissions[] permitted,address spender,uint256 nonce,uint256 deadline,";

    /// @notice owner => word position (nonce >> 8) => bitmap of used nonces (bit = nonce & 0xff).
    mapping(address => mapping(uint256 => uint256)) public nonceBitmap;

    // ---- EIP-712 ----

    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(abi.encode(_TYPE_HASH, _HASHED_NAME, block.chainid, address(this)));
    }

    // ---- single token ----

    function permitTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes calldata signature
    ) external {
        bytes32 dataHash = keccak256(
            abi.encode(
                _PERMIT_TRANSFER_FROM_TYPEHASH, _hashTokenPermissions(permit.permitted), msg.sender, permit.nonce,
                permit.deadline
            )
        );
        _permitTransferFrom(permit, transferDetails, owner, dataHash, signature);
    }

    function permitWitnessTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external {
        bytes32 typeHash = keccak256(abi.encodePacked(_PERMIT_TRANSFER_FROM_WITNESS_TYPEHASH_STUB, witnessTypeString));
        bytes32 dataHash = keccak256(
            abi.encode(
                typeHash, _hashTokenPermissions(permit.permitted), msg.sender, permit.nonce, permit.deadline, witness
            )
        );
        _permitTransferFrom(permit, transferDetails, owner, dataHash, signature);
    }

    // ---- batch ----

    function permitTransferFrom(
        PermitBatchTransferFrom calldata permit,
        SignatureTransferDetails[] calldata transferDetails,
        address owner,
        bytes calldata signature
    ) external {
        bytes32 dataHash = keccak256(
            abi.encode(
                _PERMIT_BATCH_TRANSFER_FROM_TYPEHASH, _hashTokenPermissionsArray(permit.permitted), msg.sender,
                permit.nonce, permit.deadline
            )
        );
        _permitBatchTransferFrom(permit, transferDetails, owner, dataHash, signature);
    }

    function permitWitnessTransferFrom(
        PermitBatchTransferFrom calldata permit,
        SignatureTransferDetails[] calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external {
        bytes32 typeHash =
            keccak256(abi.encodePacked(_PERMIT_BATCH_WITNESS_TRANSFER_FROM_TYPEHASH_STUB, witnessTypeString));
        bytes32 dataHash = keccak256(
            abi.encode(
                typeHash, _hashTokenPermissionsArray(permit.permitted), msg.sender, permit.nonce, permit.deadline,
                witness
            )
        );
        _permitBatchTransferFrom(permit, transferDetails, owner, dataHash, signature);
    }

    // ---- nonces ----

    /// @notice Marks the nonces whose bits are set in `mask` (at word `wordPos`) as used.
    function invalidateUnorderedNonces(uint256 wordPos, uint256 mask) external {
        nonceBitmap[msg.sender][wordPos] |= mask;
        emit UnorderedNonceInvalidation(msg.sender, wordPos, mask);
    }

    // ---- internals (Uniswap's check order: deadline, amount, nonce, signature, transfer) ----

    function _permitTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 dataHash,
        bytes calldata signature
    ) private {
        uint256 requestedAmount = transferDetails.requestedAmount;
        if (block.timestamp > permit.deadline) revert SignatureExpired(permit.deadline);
        if (requestedAmount > permit.permitted.amount) revert InvalidAmount(permit.permitted.amount);
        _useUnorderedNonce(owner, permit.nonce);
        signature.verify(_hashTypedData(dataHash), owner);
        _safeTransferFrom(permit.permitted.token, owner, transferDetails.to, requestedAmount);
    }

    function _permitBatchTransferFrom(
        PermitBatchTransferFrom calldata permit,
        SignatureTransferDetails[] calldata transferDetails,
        address owner,
        bytes32 dataHash,
        bytes calldata signature
    ) private {
        uint256 numPermitted = permit.permitted.length;
        if (block.timestamp > permit.deadline) revert SignatureExpired(permit.deadline);
        if (numPermitted != transferDetails.length) revert LengthMismatch();
        _useUnorderedNonce(owner, permit.nonce);
        signature.verify(_hashTypedData(dataHash), owner);
        for (uint256 i = 0; i < numPermitted; ++i) {
            TokenPermissions calldata permitted = permit.permitted[i];
            uint256 requestedAmount = transferDetails[i].requestedAmount;
            if (requestedAmount > permitted.amount) revert InvalidAmount(permitted.amount);
            // A zero request skips that token (the spender may take only some of the permitted ones).
            if (requestedAmount != 0) {
                _safeTransferFrom(permitted.token, owner, transferDetails[i].to, requestedAmount);
            }
        }
    }

    /// @dev Flips the nonce's bit; reverts if it was already set (used or invalidated).
    function _useUnorderedNonce(address from, uint256 nonce) private {
        uint256 wordPos = uint256(uint248(nonce >> 8));
        uint256 bit = 1 << uint8(nonce);
        uint256 flipped = nonceBitmap[from][wordPos] ^= bit;
        if (flipped & bit == 0) revert InvalidNonce();
    }

    function _hashTypedData(bytes32 dataHash) private view returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR(), dataHash));
    }

    function _hashTokenPermissions(TokenPermissions calldata permitted) private pure returns (bytes32) {
        return keccak256(abi.encode(_TOKEN_PERMISSIONS_TYPEHASH, permitted.token, permitted.amount));
    }

    function _hashTokenPermissionsArray(TokenPermissions[] calldata permitted) private pure returns (bytes32) {
        bytes32[] memory hashes = new bytes32[](permitted.length);
        for (uint256 i = 0; i < permitted.length; ++i) {
            hashes[i] = _hashTokenPermissions(permitted[i]);
        }
        return keccak256(abi.encodePacked(hashes));
    }

    /// @dev solmate SafeTransferLib.safeTransferFrom semantics: success iff the call did not revert
    ///      and returned either nothing or a first word equal to 1. No extcodesize check (like
    ///      solmate): a token address without code "succeeds".
    function _safeTransferFrom(address token, address from, address to, uint256 amount) private {
        (bool ok, bytes memory ret) = token.call(abi.encodeWithSelector(0x23b872dd, from, to, amount));
        bool success = ok && (ret.length == 0 || (ret.length >= 32 && abi.decode(ret, (uint256)) == 1));
        require(success, "TRANSFER_FROM_FAILED");
    }
}
