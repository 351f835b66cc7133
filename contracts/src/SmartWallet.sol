// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {ECRecover} from "./lib/ECRecover.sol";

/// @title SmartWallet
/// @notice Minimal ERC-1271 contract wallet for tests: a payment "from" this wallet is valid when
///         its single EOA owner signed the EIP-712 digest. Lets tests exercise the bytes-signature
///         path of EIP-3009 (and, through `execute`, anything an owner may want the wallet to do,
///         such as approving a spender).
contract SmartWallet {
    bytes4 private constant ERC1271_MAGIC_VALUE = 0x1626ba7e;
    bytes4 private constant ERC1271_INVALID = 0xffffffff;

    address public immutable owner;

    event Executed(address indexed target, uint256 value, bytes data);

    constructor(address walletOwner) {
        require(walletOwner != address(0), "SmartWallet: owner is the zero address");
        owner = walletOwner;
    }

    receive() external payable {}

    /// @notice ERC-1271. `hash` is checked as given (no "\x19Ethereum Signed Message" prefix), so an
    ///         owner's EIP-712 signature of a token authorization is accepted as the wallet's own.
    ///         Never reverts on a malformed signature; answers "invalid" instead.
    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        (address signer, ECRecover.RecoverError err) = ECRecover.tryRecover(hash, signature);
        return err == ECRecover.RecoverError.None && signer == owner ? ERC1271_MAGIC_VALUE : ERC1271_INVALID;
    }

    /// @notice Bubbles up the target's revert data unchanged so tests see the real reason.
    function execute(address target, uint256 value, bytes calldata data) external returns (bytes memory) {
        require(msg.sender == owner, "SmartWallet: caller is not the owner");
        (bool success, bytes memory result) = target.call{value: value}(data);
        if (!success) {
            assembly ("memory-safe") {
                revert(add(result, 0x20), mload(result))
            }
        }
        emit Executed(target, value, data);
        return result;
    }
}
