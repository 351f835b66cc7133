// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

/// @title ECRecover
/// @notice secp256k1 signer recovery with the same malleability rules and revert strings as
///         Circle FiatToken's ECRecover library, so a facilitator sees on the devnet exactly the
///         revert reasons it would see from real USDC.
library ECRecover {
    /// @dev secp256k1n / 2. Signatures with a larger `s` have a twin (n - s, flipped v) that
    ///      recovers the same signer; accepting both would allow signature malleability (EIP-2).
    uint256 private constant HALF_CURVE_ORDER =
        0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    enum RecoverError {
        None,
        InvalidLength,
        InvalidS,
        InvalidV,
        InvalidSignature
    }

    /// @notice Recover without reverting; `signer` is zero whenever `err` is not `None`.
    function tryRecover(bytes32 digest, uint8 v, bytes32 r, bytes32 s)
        internal
        pure
        returns (address signer, RecoverError err)
    {
        if (uint256(s) > HALF_CURVE_ORDER) return (address(0), RecoverError.InvalidS);
        // Only the Ethereum "27/28" encoding; 0/1 (raw recovery id) is refused like FiatToken.
        if (v != 27 && v != 28) return (address(0), RecoverError.InvalidV);
        signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) return (address(0), RecoverError.InvalidSignature);
        return (signer, RecoverError.None);
    }

    /// @notice `tryRecover` for a 65-byte `r || s || v` signature.
    function tryRecover(bytes32 digest, bytes memory signature)
        internal
        pure
        returns (address, RecoverError)
    {
        if (signature.length != 65) return (address(0), RecoverError.InvalidLength);
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly ("memory-safe") {
            r := mload(add(signature, 0x20))
            s := mload(add(signature, 0x40))
            v := byte(0, mload(add(signature, 0x60)))
        }
        return tryRecover(digest, v, r, s);
    }

    /// @notice Recover or revert with FiatToken's ECRecover revert strings.
    function recover(bytes32 digest, uint8 v, bytes32 r, bytes32 s) internal pure returns (address) {
        (address signer, RecoverError err) = tryRecover(digest, v, r, s);
        _throwIfError(err);
        return signer;
    }

    /// @notice Recover from a 65-byte `r || s || v` signature or revert with FiatToken's strings.
    function recover(bytes32 digest, bytes memory signature) internal pure returns (address) {
        (address signer, RecoverError err) = tryRecover(digest, signature);
        _throwIfError(err);
        return signer;
    }

    function _throwIfError(RecoverError err) private pure {
        if (err == RecoverError.None) return;
        if (err == RecoverError.InvalidLength) revert("ECRecover: invalid signature length");
        if (err == RecoverError.InvalidS) revert("ECRecover: invalid signature 's' value");
        if (err == RecoverError.InvalidV) revert("ECRecover: invalid signature 'v' value");
        revert("ECRecover: invalid signature");
    }
}
