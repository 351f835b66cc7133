// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

/// @title SignatureVerification
/// @notice Permit2's signature rules (Uniswap `permit2` src/libraries/SignatureVerification.sol),
///         re-implemented: an address without code must have signed with ECDSA, as a 65-byte
///         `r || s || v` or a 64-byte EIP-2098 compact `r || vs` signature; an address with code is
///         asked via ERC-1271 and must answer `0x1626ba7e`. Unlike FiatToken's checker there is no
///         low-s rule and a reverting wallet makes the whole call revert (its reason bubbles up).
library SignatureVerification {
    error InvalidSignatureLength();
    error InvalidSignature();
    error InvalidSigner();
    error InvalidContractSignature();

    bytes4 private constant ERC1271_MAGIC_VALUE = 0x1626ba7e;
    bytes32 private constant UPPER_BIT_MASK = 0x7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff;

    function verify(bytes calldata signature, bytes32 digest, address claimedSigner) internal view {
        if (claimedSigner.code.length == 0) {
            bytes32 r;
            bytes32 s;
            uint8 v;
            if (signature.length == 65) {
                r = bytes32(signature[0:32]);
                s = bytes32(signature[32:64]);
                v = uint8(signature[64]);
            } else if (signature.length == 64) {
                r = bytes32(signature[0:32]);
                bytes32 vs = bytes32(signature[32:64]);
                s = vs & UPPER_BIT_MASK;
                v = uint8(uint256(vs >> 255)) + 27;
            } else {
                revert InvalidSignatureLength();
            }
            address signer = ecrecover(digest, v, r, s);
            if (signer == address(0)) revert InvalidSignature();
            if (signer != claimedSigner) revert InvalidSigner();
        } else {
            bytes4 magic = IERC1271(claimedSigner).isValidSignature(digest, signature);
            if (magic != ERC1271_MAGIC_VALUE) revert InvalidContractSignature();
        }
    }
}

interface IERC1271 {
    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4);
}
