// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {AccessControl} from "./lib/AccessControl.sol";
import {RSAPSS} from "./lib/RSAPSS.sol";

/// @title TEERegistry (OpenGradient chain, devnet)
/// @notice The parts of OpenGradient's og-evm TEERegistry that an x402/attestation verifier reads,
///         with OpenGradient's TEEInfo layout, getters, events, errors and roles:
///         `teeId = keccak256(publicKey)` for the TEE's RSA signing key as DER SubjectPublicKeyInfo;
///         `getTEE`, `getTEEPublicKey`, `isTEEEnabled`, `isTEEActive`, `getEnabledTEEs`,
///         `getActiveTEEs`, `getTEEsByType`, `getTEEsByOwner`, `computeTEEId`;
///         `disableTEE` / `enableTEE` (TEE owner holding TEE_OPERATOR, or an admin);
///         `heartbeat` (RSA-PSS over keccak256(abi.encodePacked(teeId, timestamp)), relayable by
///         anyone, `heartbeatMaxAge` 1800 s).
/// @dev Devnet differences: there is no Nitro attestation (the real `registerTEEWithAttestation`
///      needs the chain's 0x…0900 precompile), so `registerTEE` trusts the TEE_OPERATOR for the
///      TLS certificate and PCR hash and only checks that the key is an RSA SPKI of 2048–8192 bits;
///      there is no TEE-type or PCR management (any teeType is accepted, PCRs are not checked);
///      RSA-PSS runs in Solidity on the modexp precompile (lib/RSAPSS.sol).
contract TEERegistry is AccessControl {
    bytes32 public constant TEE_OPERATOR = keccak256("TEE_OPERATOR");

    struct TEEInfo {
        address owner;
        address paymentAddress;
        string endpoint;
        bytes publicKey;
        bytes tlsCertificate;
        bytes32 pcrHash;
        uint8 teeType;
        bool enabled;
        uint256 registeredAt;
        uint256 lastHeartbeatAt;
    }

    /// @notice Max allowed age of a heartbeat's signed timestamp (and of the last heartbeat for
    ///         `isTEEActive`), in seconds.
    uint256 public heartbeatMaxAge = 1800;

    mapping(bytes32 => TEEInfo) public tees;
    mapping(uint8 => bytes32[]) private _enabledTEEList;
    mapping(uint8 => mapping(bytes32 => uint256)) private _enabledTEEIndex;
    mapping(uint8 => bytes32[]) private _teesByType;
    mapping(address => bytes32[]) private _teesByOwner;

    event TEERegistered(bytes32 indexed teeId, address indexed owner, uint8 teeType);
    event TEEDisabled(bytes32 indexed teeId);
    event TEEEnabled(bytes32 indexed teeId);
    event HeartbeatReceived(bytes32 indexed teeId, uint256 timestamp);

    error TEEAlreadyExists();
    error TEENotFound();
    error TEENotEnabled();
    error NotTEEOwner();
    error HeartbeatSignatureInvalid();
    error HeartbeatTimestampTooOld();
    error HeartbeatTimestampInFuture();
    /// @notice Devnet only: `registerTEE` got something that is not an RSA 2048–8192-bit SPKI.
    error InvalidPublicKey();

    modifier onlyTEEOwnerOrAdmin(bytes32 teeId) {
        if (tees[teeId].registeredAt == 0) revert TEENotFound();
        bool isAdmin = hasRole(DEFAULT_ADMIN_ROLE, msg.sender);
        bool isOwnerOperator = tees[teeId].owner == msg.sender && hasRole(TEE_OPERATOR, msg.sender);
        if (!isAdmin && !isOwnerOperator) revert NotTEEOwner();
        _;
    }

    constructor() {
        _grantRole(DEFAULT_ADMIN_ROLE, msg.sender);
        _grantRole(TEE_OPERATOR, msg.sender);
        _setRoleAdmin(TEE_OPERATOR, DEFAULT_ADMIN_ROLE);
    }

    // ---- registration and lifecycle ----

    /// @notice Register an enabled TEE owned by the caller; returns keccak256(signingPublicKey).
    function registerTEE(
        bytes calldata signingPublicKey,
        bytes calldata tlsCertificate,
        address paymentAddress,
        string calldata endpoint,
        uint8 teeType,
        bytes32 pcrHash
    ) external onlyRole(TEE_OPERATOR) returns (bytes32 teeId) {
        teeId = keccak256(signingPublicKey);
        if (tees[teeId].registeredAt != 0) revert TEEAlreadyExists();
        (bool ok,,) = RSAPSS.parsePublicKey(signingPublicKey);
        if (!ok) revert InvalidPublicKey();

        tees[teeId] = TEEInfo({
            owner: msg.sender,
            paymentAddress: paymentAddress,
            endpoint: endpoint,
            publicKey: signingPublicKey,
            tlsCertificate: tlsCertificate,
            pcrHash: pcrHash,
            teeType: teeType,
            enabled: true,
            registeredAt: block.timestamp,
            lastHeartbeatAt: block.timestamp
        });
        _addToEnabledList(teeId, teeType);
        _teesByType[teeType].push(teeId);
        _teesByOwner[msg.sender].push(teeId);
        emit TEERegistered(teeId, msg.sender, teeType);
    }

    /// @notice Reverts TEENotEnabled when the TEE is already disabled (as OpenGradient's).
    function disableTEE(bytes32 teeId) external onlyTEEOwnerOrAdmin(teeId) {
        TEEInfo storage tee = tees[teeId];
        if (!tee.enabled) revert TEENotEnabled();
        tee.enabled = false;
        _removeFromEnabledList(teeId, tee.teeType);
        emit TEEDisabled(teeId);
    }

    /// @notice A no-op (no event) when the TEE is already enabled (as OpenGradient's).
    function enableTEE(bytes32 teeId) external onlyTEEOwnerOrAdmin(teeId) {
        TEEInfo storage tee = tees[teeId];
        if (tee.enabled) return;
        tee.enabled = true;
        _addToEnabledList(teeId, tee.teeType);
        emit TEEEnabled(teeId);
    }

    /// @notice Liveness proof: RSA-PSS (SHA-256, salt 32) by the TEE's key over
    ///         keccak256(abi.encodePacked(teeId, timestamp)); anyone may relay it.
    function heartbeat(bytes32 teeId, uint256 timestamp, bytes calldata signature) external {
        TEEInfo storage tee = tees[teeId];
        if (tee.registeredAt == 0) revert TEENotFound();
        if (!tee.enabled) revert TEENotEnabled();
        if (timestamp > block.timestamp) revert HeartbeatTimestampInFuture();
        if (block.timestamp - timestamp > heartbeatMaxAge) revert HeartbeatTimestampTooOld();
        if (!RSAPSS.verify(tee.publicKey, keccak256(abi.encodePacked(teeId, timestamp)), signature)) {
            revert HeartbeatSignatureInvalid();
        }
        tee.lastHeartbeatAt = block.timestamp;
        emit HeartbeatReceived(teeId, timestamp);
    }

    function setHeartbeatMaxAge(uint256 maxAge) external onlyRole(DEFAULT_ADMIN_ROLE) {
        heartbeatMaxAge = maxAge;
    }

    // ---- queries ----

    function getTEE(bytes32 teeId) external view returns (TEEInfo memory) {
        if (tees[teeId].registeredAt == 0) revert TEENotFound();
        return tees[teeId];
    }

    /// @notice Empty for an unknown teeId (no revert), as OpenGradient's.
    function getTEEPublicKey(bytes32 teeId) external view returns (bytes memory) {
        return tees[teeId].publicKey;
    }

    function isTEEEnabled(bytes32 teeId) external view returns (bool) {
        return tees[teeId].enabled;
    }

    /// @notice Enabled and heartbeat not older than `heartbeatMaxAge` (no PCR check on the devnet).
    function isTEEActive(bytes32 teeId) external view returns (bool) {
        return _isTEEActive(tees[teeId]);
    }

    function getEnabledTEEs(uint8 teeType) external view returns (bytes32[] memory) {
        return _enabledTEEList[teeType];
    }

    function getActiveTEEs(uint8 teeType) external view returns (TEEInfo[] memory result) {
        bytes32[] storage list = _enabledTEEList[teeType];
        uint256 count = 0;
        for (uint256 i = 0; i < list.length; i++) {
            if (_isTEEActive(tees[list[i]])) count++;
        }
        result = new TEEInfo[](count);
        uint256 j = 0;
        for (uint256 i = 0; i < list.length; i++) {
            if (_isTEEActive(tees[list[i]])) result[j++] = tees[list[i]];
        }
    }

    function getTEEsByType(uint8 teeType) external view returns (bytes32[] memory) {
        return _teesByType[teeType];
    }

    function getTEEsByOwner(address owner) external view returns (bytes32[] memory) {
        return _teesByOwner[owner];
    }

    function computeTEEId(bytes calldata publicKey) external pure returns (bytes32) {
        return keccak256(publicKey);
    }

    // ---- internals ----

    function _isTEEActive(TEEInfo storage tee) private view returns (bool) {
        return tee.enabled && block.timestamp - tee.lastHeartbeatAt <= heartbeatMaxAge;
    }

    function _addToEnabledList(bytes32 teeId, uint8 teeType) private {
        _enabledTEEIndex[teeType][teeId] = _enabledTEEList[teeType].length;
        _enabledTEEList[teeType].push(teeId);
    }

    function _removeFromEnabledList(bytes32 teeId, uint8 teeType) private {
        bytes32[] storage list = _enabledTEEList[teeType];
        uint256 index = _enabledTEEIndex[teeType][teeId];
        uint256 lastIndex = list.length - 1;
        if (index != lastIndex) {
            bytes32 lastTeeId = list[lastIndex];
            list[index] = lastTeeId;
            _enabledTEEIndex[teeType][lastTeeId] = index;
        }
        list.pop();
        delete _enabledTEEIndex[teeType][teeId];
    }
}
