// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {ISignatureTransfer} from "./interfaces/ISignatureTransfer.sol";

/// @title X402ExactPermit2Proxy
/// @notice Devnet re-implementation of the x402 `exact` Permit2 proxy (x402ExactPermit2Proxy,
///         canonical address 0x402085c248EeA27D92E8b30b2C58ed07f9E20001) with the same `settle`
///         ABI: the payer signs a Permit2 PermitWitnessTransferFrom with this contract as spender
///         and the witness `Witness(address to,uint256 validAfter)`; anyone may submit it, and it
///         always moves exactly the permitted amount, to `witness.to` only.
/// @dev Checks, in order: InvalidOwner, InvalidDestination, PaymentTooEarly; then Permit2's own
///      (deadline, nonce, signature). setCode-friendly like X402UptoPermit2Proxy: the canonical
///      Permit2 address is a constant and the reentrancy guard lives in transient storage, so no
///      constructor is needed. The EIP-2612 `settleWithPermit` path is not reproduced.
contract X402ExactPermit2Proxy {
    ISignatureTransfer public constant PERMIT2 = ISignatureTransfer(0x000000000022D473030F116dDEE9F6B43aC78BA3);

    /// @notice Appended by Permit2 to "PermitWitnessTransferFrom(TokenPermissions permitted,address
    ///         spender,uint256 nonce,uint256 deadline," to form the signed type.
    string public constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,uint256 validAfter)";

    bytes32 public constant WITNESS_TYPEHASH = keccak256("Witness(address to,uint256 validAfter)");

    struct Witness {
        address to;
        uint256 validAfter;
    }

    event Settled();

    error InvalidDestination();
    error PaymentTooEarly();
    error InvalidOwner();
    /// @notice OpenZeppelin ReentrancyGuard(Transient)'s error.
    error ReentrancyGuardReentrantCall();

    bool private transient _entered;

    modifier nonReentrant() {
        if (_entered) revert ReentrancyGuardReentrantCall();
        _entered = true;
        _;
        _entered = false;
    }

    /// @notice Moves exactly `permit.permitted.amount` of the permitted token from `owner` to
    ///         `witness.to`. Any sender may call. Emits `Settled()`.
    function settle(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external nonReentrant {
        if (owner == address(0)) revert InvalidOwner();
        if (witness.to == address(0)) revert InvalidDestination();
        if (block.timestamp < witness.validAfter) revert PaymentTooEarly();
        bytes32 witnessHash = keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.validAfter));
        PERMIT2.permitWitnessTransferFrom(
            permit,
            ISignatureTransfer.SignatureTransferDetails({to: witness.to, requestedAmount: permit.permitted.amount}),
            owner,
            witnessHash,
            WITNESS_TYPE_STRING,
            signature
        );
        emit Settled();
    }
}
