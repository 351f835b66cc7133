// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

/// @title RSAPSS
/// @notice RSASSA-PSS verification (RFC 8017 §8.1.2 / §9.1.2) with SHA-256, MGF1-SHA-256 and a
///         32-byte salt, for keys given as DER SubjectPublicKeyInfo (rsaEncryption) of 2048 to
///         8192 bits. Stands in for OpenGradient's TEE precompile (0x…0900 `verifyRSAPSS`), which
///         does Go's `rsa.VerifyPSS(pub, SHA256, sha256(message), sig, saltLength 32)`; here the
///         modular exponentiation uses the EIP-198 modexp precompile (0x05), so it runs on anvil.
///         Never reverts on bad input: every malformed key or signature is just "not valid".
library RSAPSS {
    uint256 private constant MIN_MODULUS_BITS = 2048;
    uint256 private constant MAX_MODULUS_BITS = 8192;
    uint256 private constant H_LEN = 32;
    uint256 private constant S_LEN = 32;

    /// @notice True iff `signature` is an RSA-PSS signature by `spki`'s key over the 32-byte
    ///         `message` (the signer hashed `message` with SHA-256 first, as OpenGradient TEEs do).
    function verify(bytes memory spki, bytes32 message, bytes memory signature) internal view returns (bool) {
        (bool ok, bytes memory modulus, bytes memory exponent) = parsePublicKey(spki);
        if (!ok) return false;
        uint256 k = modulus.length;
        if (signature.length != k || !_lessThan(signature, modulus)) return false;
        bytes memory m;
        (ok, m) = _modexp(signature, exponent, modulus);
        if (!ok) return false;
        return _emsaPssVerify(m, _bitLength(modulus) - 1, sha256(abi.encodePacked(message)));
    }

    /// @notice Modulus and public exponent (big-endian, no leading zero bytes) of an RSA
    ///         SubjectPublicKeyInfo; `ok` is false unless it is a well-formed rsaEncryption key of
    ///         2048 to 8192 bits with an odd exponent > 1.
    function parsePublicKey(bytes memory spki)
        internal
        pure
        returns (bool ok, bytes memory modulus, bytes memory exponent)
    {
        // SubjectPublicKeyInfo ::= SEQUENCE { algorithm AlgorithmIdentifier, subjectPublicKey BIT STRING }
        (bool good, uint256 start, uint256 len) = _header(spki, 0, 0x30);
        if (!good || start + len != spki.length) return (false, "", "");
        uint256 end = start + len;
        // AlgorithmIdentifier ::= SEQUENCE { rsaEncryption OID, NULL }
        uint256 algStart;
        uint256 algLen;
        (good, algStart, algLen) = _header(spki, start, 0x30);
        if (!good) return (false, "", "");
        uint256 algEnd = algStart + algLen;
        (good, start, len) = _header(spki, algStart, 0x06);
        if (!good || len != 9 || keccak256(_slice(spki, start, 9)) != keccak256(hex"2a864886f70d010101")) {
            return (false, "", "");
        }
        start += 9;
        if (start != algEnd && !(start + 2 == algEnd && spki[start] == 0x05 && spki[start + 1] == 0x00)) {
            return (false, "", "");
        }
        // BIT STRING with no unused bits, wrapping RSAPublicKey ::= SEQUENCE { n INTEGER, e INTEGER }
        (good, start, len) = _header(spki, algEnd, 0x03);
        if (!good || start + len != end || len == 0 || spki[start] != 0x00) return (false, "", "");
        (good, start, len) = _header(spki, start + 1, 0x30);
        if (!good || start + len != end) return (false, "", "");
        uint256 nStart;
        uint256 nLen;
        (good, nStart, nLen) = _header(spki, start, 0x02);
        if (!good) return (false, "", "");
        uint256 eStart;
        uint256 eLen;
        (good, eStart, eLen) = _header(spki, nStart + nLen, 0x02);
        if (!good || eStart + eLen != end) return (false, "", "");
        (good, modulus) = _unsignedInteger(spki, nStart, nLen);
        if (!good) return (false, "", "");
        (good, exponent) = _unsignedInteger(spki, eStart, eLen);
        if (!good || exponent.length > 32) return (false, "", "");
        uint256 bits = _bitLength(modulus);
        if (bits < MIN_MODULUS_BITS || bits > MAX_MODULUS_BITS) return (false, "", "");
        uint8 lastE = uint8(exponent[exponent.length - 1]);
        if (lastE & 1 == 0 || (exponent.length == 1 && lastE < 3)) return (false, "", "");
        return (true, modulus, exponent);
    }

    // ---- EMSA-PSS-VERIFY (RFC 8017 §9.1.2), hLen = sLen = 32 ----

    function _emsaPssVerify(bytes memory m, uint256 emBits, bytes32 mHash) private pure returns (bool) {
        uint256 emLen = (emBits + 7) / 8;
        // m has k bytes; EM is its last emLen bytes, anything before must be zero.
        uint256 off = m.length - emLen;
        for (uint256 i = 0; i < off; ++i) {
            if (m[i] != 0) return false;
        }
        if (emLen < H_LEN + S_LEN + 2) return false;
        if (uint8(m[off + emLen - 1]) != 0xbc) return false;
        uint256 dbLen = emLen - H_LEN - 1;
        bytes32 h;
        assembly ("memory-safe") {
            h := mload(add(add(m, 32), add(off, dbLen)))
        }
        uint8 topMask = uint8((uint256(0xff) << (8 - (8 * emLen - emBits))) & 0xff);
        if (uint8(m[off]) & topMask != 0) return false;
        // DB = maskedDB xor MGF1(H, dbLen)
        bytes memory db = new bytes(dbLen);
        for (uint256 i = 0; i < dbLen; i += 32) {
            bytes32 mask = sha256(abi.encodePacked(h, uint32(i / 32)));
            for (uint256 j = 0; j < 32 && i + j < dbLen; ++j) {
                db[i + j] = m[off + i + j] ^ mask[j];
            }
        }
        db[0] = bytes1(uint8(db[0]) & ~topMask);
        uint256 psLen = dbLen - S_LEN - 1;
        for (uint256 i = 0; i < psLen; ++i) {
            if (db[i] != 0) return false;
        }
        if (db[psLen] != 0x01) return false;
        bytes32 salt;
        assembly ("memory-safe") {
            salt := mload(add(add(db, 32), sub(dbLen, 32)))
        }
        return sha256(abi.encodePacked(bytes8(0), mHash, salt)) == h;
    }

    // ---- helpers ----

    function _modexp(bytes memory base, bytes memory exponent, bytes memory modulus)
        private
        view
        returns (bool ok, bytes memory result)
    {
        bytes memory input = abi.encodePacked(base.length, exponent.length, modulus.length, base, exponent, modulus);
        result = new bytes(modulus.length);
        assembly ("memory-safe") {
            ok := staticcall(gas(), 0x05, add(input, 32), mload(input), add(result, 32), mload(modulus))
        }
    }

    /// @dev DER tag-length header at `pos`: returns where the content starts and its length.
    function _header(bytes memory data, uint256 pos, uint8 tag)
        private
        pure
        returns (bool ok, uint256 start, uint256 len)
    {
        if (pos + 2 > data.length || uint8(data[pos]) != tag) return (false, 0, 0);
        uint256 first = uint8(data[pos + 1]);
        start = pos + 2;
        if (first < 0x80) {
            len = first;
        } else {
            uint256 n = first & 0x7f;
            if (n == 0 || n > 4 || start + n > data.length) return (false, 0, 0);
            for (uint256 i = 0; i < n; ++i) {
                len = (len << 8) | uint8(data[start + i]);
            }
            start += n;
        }
        if (start + len > data.length) return (false, 0, 0);
        return (true, start, len);
    }

    /// @dev A non-negative DER INTEGER's magnitude without leading zero bytes.
    function _unsignedInteger(bytes memory data, uint256 start, uint256 len)
        private
        pure
        returns (bool ok, bytes memory value)
    {
        if (len == 0 || uint8(data[start]) & 0x80 != 0) return (false, "");
        while (len > 1 && data[start] == 0) {
            ++start;
            --len;
        }
        if (data[start] == 0) return (false, "");
        return (true, _slice(data, start, len));
    }

    function _slice(bytes memory data, uint256 start, uint256 len) private pure returns (bytes memory out) {
        out = new bytes(len);
        assembly ("memory-safe") {
            mcopy(add(out, 32), add(add(data, 32), start), len)
        }
    }

    function _bitLength(bytes memory value) private pure returns (uint256 bits) {
        if (value.length == 0) return 0;
        uint256 top = uint8(value[0]);
        bits = 8 * (value.length - 1);
        while (top != 0) {
            ++bits;
            top >>= 1;
        }
    }

    /// @dev Big-endian a < b for equal lengths.
    function _lessThan(bytes memory a, bytes memory b) private pure returns (bool) {
        for (uint256 i = 0; i < a.length; ++i) {
            if (a[i] != b[i]) return uint8(a[i]) < uint8(b[i]);
        }
        return false;
    }
}
