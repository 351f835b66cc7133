// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {ISignatureTransfer} from "./interfaces/ISignatureTransfer.sol";

interface IERC20Permit {
    function permit(address owner, address spender, uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external;
}

/// @title X402UptoPermit2Proxy
/// @notice Devnet re-implementation of the x402 `upto` Permit2 proxy (x402UptoPermit2Proxy,
///         canonical address 0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002) with the same ABI: the
///         payer signs a Permit2 PermitWitnessTransferFrom with this contract as spender and the
///         witness `Witness(address to,address facilitator,uint256 validAfter)`; the facilitator
///         named in the witness settles any `amount` up to the signed cap, to `witness.to` only.
/// @dev Follows the x402-foundation version where each proxy computes its own witness hash
///      (checks, in order: AmountExceedsPermitted, UnauthorizedFacilitator, InvalidAmount (zero),
///      InvalidOwner, InvalidDestination, PaymentTooEarly; then Permit2's own checks).
///      setCode-friendly: the real contract takes the Permit2 address as a constructor argument
///      and keeps it in an immutable; here it is the canonical constant, and the reentrancy guard
///      lives in transient storage, so no constructor or initializer is needed.
contract X402UptoPermit2Proxy {
    ISignatureTransfer public constant PERMIT2 = ISignatureTransfer(0x000000000022D473030F116dDEE9F6B43aC78BA3);

    /// @notice Appended by Permit2 to "PermitWitnessTransferFrom(TokenPermissions permitted,address
    ///         spender,uint256 nonce,uint256 deadline," to form the signed type.
    string public constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)";

    bytes32 public constant WITNESS_TYPEHASH = keccak256("Witness(address to,address facilitator,uint256 validAfter)");

    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }

    struct EIP2612Permit {
        uint256 value;
        uint256 deadline;
        bytes32 r;
        bytes32 s;
        uint8 v;
    }

    event Settled();
    event SettledWithPermit();
    event EIP2612PermitFailedWithReason(address indexed token, address indexed owner, string reason);
    event EIP2612PermitFailedWithPanic(address indexed token, address indexed owner, uint256 errorCode);
    event EIP2612PermitFailedWithData(address indexed token, address indexed owner, bytes data);

    error InvalidDestination();
    error PaymentTooEarly();
    error InvalidOwner();
    error InvalidAmount();
    error Permit2612AmountMismatch();
    error UnauthorizedFacilitator();
    error AmountExceedsPermitted();
    /// @notice OpenZeppelin ReentrancyGuard(Transient)'s error.
    error ReentrancyGuardReentrantCall();

    bool private transient _entered;

    modifier nonReentrant() {
        if (_entered) revert ReentrancyGuardReentrantCall();
        _entered = true;
        _;
        _entered = false;
    }

    /// @notice Moves `amount` (<= permit.permitted.amount) of the permitted token from `owner` to
    ///         `witness.to`; only `witness.facilitator` may call. Emits `Settled()`.
    function settle(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external nonReentrant {
        if (amount > permit.permitted.amount) revert AmountExceedsPermitted();
        if (msg.sender != witness.facilitator) revert UnauthorizedFacilitator();
        _settle(permit, amount, owner, witness, signature);
        emit Settled();
    }

    /// @notice Like `settle`, after first trying the token's EIP-2612 `permit(owner, PERMIT2, …)`
    ///         (whose failure is only logged: the Permit2 allowance may already exist).
    ///         `permit2612.value` must equal the signed cap. Emits `SettledWithPermit()`.
    function settleWithPermit(
        EIP2612Permit calldata permit2612,
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external nonReentrant {
        if (amount > permit.permitted.amount) revert AmountExceedsPermitted();
        if (msg.sender != witness.facilitator) revert UnauthorizedFacilitator();
        _executePermit(permit.permitted.token, owner, permit2612, permit.permitted.amount);
        _settle(permit, amount, owner, witness, signature);
        emit SettledWithPermit();
    }

    function _settle(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) private {
        if (amount == 0) revert InvalidAmount();
        if (owner == address(0)) revert InvalidOwner();
        if (witness.to == address(0)) revert InvalidDestination();
        if (block.timestamp < witness.validAfter) revert PaymentTooEarly();
        bytes32 witnessHash = keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.facilitator, witness.validAfter));
        PERMIT2.permitWitnessTransferFrom(
            permit,
            ISignatureTransfer.SignatureTransferDetails({to: witness.to, requestedAmount: amount}),
            owner,
            witnessHash,
            WITNESS_TYPE_STRING,
            signature
        );
    }

    function _executePermit(address token, address owner, EIP2612Permit calldata permit2612, uint256 permittedAmount)
        private
    {
        if (permit2612.value != permittedAmount) revert Permit2612AmountMismatch();
        try IERC20Permit(token).permit(
            owner, address(PERMIT2), permit2612.value, permit2612.deadline, permit2612.v, permit2612.r, permit2612.s
        ) {
            // approved
        } catch Error(string memory reason) {
            emit EIP2612PermitFailedWithReason(token, owner, reason);
        } catch Panic(uint256 errorCode) {
            emit EIP2612PermitFailedWithPanic(token, owner, errorCode);
        } catch (bytes memory data) {
            emit EIP2612PermitFailedWithData(token, owner, data);
        }
    }
}
