// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {ECRecover} from "./ECRecover.sol";

/// @title SignatureChecker
/// @notice "Is this a valid signature of `signer` over `digest` right now?" for both EOAs and
///         contract wallets, decided like OpenZeppelin's / FiatToken v2.2's SignatureChecker: an
///         address with code is asked via ERC-1271, any other address is checked with ECDSA.
library SignatureChecker {
    /// @dev `bytes4(keccak256("isValidSignature(bytes32,bytes)"))`, the ERC-1271 success value.
    bytes4 internal constant ERC1271_MAGIC_VALUE = 0x1626ba7e;

    /// @notice For an EOA this reverts (FiatToken ECRecover strings) on a malformed signature
    ///         instead of returning false, exactly like FiatToken v2.2.
    function isValidSignatureNow(address signer, bytes32 digest, bytes memory signature)
        internal
        view
        returns (bool)
    {
        if (signer.code.length == 0) {
            return ECRecover.recover(digest, signature) == signer;
        }
        return isValidERC1271SignatureNow(signer, digest, signature);
    }

    /// @notice Never reverts: a wallet that reverts, returns garbage or returns short data is
    ///         simply "not valid".
    function isValidERC1271SignatureNow(address signer, bytes32 digest, bytes memory signature)
        internal
        view
        returns (bool)
    {
        (bool success, bytes memory result) = signer.staticcall(
            abi.encodeWithSelector(ERC1271_MAGIC_VALUE, digest, signature)
        );
        return success && result.length >= 32
            && abi.decode(result, (bytes32)) == bytes32(ERC1271_MAGIC_VALUE);
    }
}
