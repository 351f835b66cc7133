// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {AccessControl} from "./lib/AccessControl.sol";
import {RSAPSS} from "./lib/RSAPSS.sol";

interface ITEERegistryView {
    function isTEEEnabled(bytes32 teeId) external view returns (bool);
    function getTEEPublicKey(bytes32 teeId) external view returns (bytes memory);
}

/// @title InferenceSettlementRelay (OpenGradient chain, devnet)
/// @notice OpenGradient's settlement relay (og-evm contracts/solidity/InferenceSettlementRelay.sol)
///         with its exact functions, events and role: `batchSettle` emits `BatchSettlement`,
///         `settleIndividual` emits `IndividualSettlement`; both need SETTLEMENT_RELAY_ROLE, which
///         the deployer holds and the admin (DEFAULT_ADMIN_ROLE) grants.
/// @dev OpenGradient's relay asks a TEEInferenceVerifier; here that check is built in and runs
///      against `TEE_REGISTRY` when one was given at deployment: the TEE must be enabled, the
///      timestamp within [now - 1 h, now + 5 min], and the signature RSA-PSS (SHA-256, salt 32) by
///      the TEE's registered key over keccak256(abi.encodePacked(inputHash, outputHash, timestamp));
///      otherwise `revert("Invalid signature")`. With registry address zero `settleIndividual`
///      only emits (like the copy in OpenGradient's inference-facilitator repository).
contract InferenceSettlementRelay is AccessControl {
    bytes32 public constant SETTLEMENT_RELAY_ROLE = keccak256("SETTLEMENT_RELAY_ROLE");
    uint256 public constant MAX_INFERENCE_AGE = 1 hours;
    uint256 public constant FUTURE_TOLERANCE = 5 minutes;

    /// @notice Registry used to check individual settlements (zero: no check).
    ITEERegistryView public immutable TEE_REGISTRY;

    event BatchSettlement(bytes32 indexed merkleRoot, uint256 batchSize, bytes walrusBlobId);
    event IndividualSettlement(
        bytes32 indexed teeId,
        address indexed ethAddress,
        bytes32 inputHash,
        bytes32 outputHash,
        uint256 timestamp,
        bytes walrusBlobId,
        bytes signature
    );

    constructor(address teeRegistry) {
        _grantRole(DEFAULT_ADMIN_ROLE, msg.sender);
        _grantRole(SETTLEMENT_RELAY_ROLE, msg.sender);
        TEE_REGISTRY = ITEERegistryView(teeRegistry);
    }

    function batchSettle(bytes32 _merkleRoot, uint256 _batchSize, bytes calldata _walrusBlobId)
        external
        onlyRole(SETTLEMENT_RELAY_ROLE)
    {
        emit BatchSettlement(_merkleRoot, _batchSize, _walrusBlobId);
    }

    function settleIndividual(
        bytes32 _teeId,
        bytes32 _inputHash,
        bytes32 _outputHash,
        uint256 _timestamp,
        address _ethAddress,
        bytes calldata _walrusBlobId,
        bytes calldata _signature
    ) external onlyRole(SETTLEMENT_RELAY_ROLE) {
        if (address(TEE_REGISTRY) != address(0)) {
            require(verifySignature(_teeId, _inputHash, _outputHash, _timestamp, _signature), "Invalid signature");
        }
        emit IndividualSettlement(_teeId, _ethAddress, _inputHash, _outputHash, _timestamp, _walrusBlobId, _signature);
    }

    /// @notice TEEInferenceVerifier.verifySignature semantics against `TEE_REGISTRY` (false when
    ///         no registry is configured).
    function verifySignature(
        bytes32 teeId,
        bytes32 inputHash,
        bytes32 outputHash,
        uint256 timestamp,
        bytes calldata signature
    ) public view returns (bool) {
        if (address(TEE_REGISTRY) == address(0)) return false;
        if (!TEE_REGISTRY.isTEEEnabled(teeId)) return false;
        uint256 minTs = block.timestamp > MAX_INFERENCE_AGE ? block.timestamp - MAX_INFERENCE_AGE : 0;
        if (timestamp < minTs || timestamp > block.timestamp + FUTURE_TOLERANCE) return false;
        return RSAPSS.verify(
            TEE_REGISTRY.getTEEPublicKey(teeId), computeMessageHash(inputHash, outputHash, timestamp), signature
        );
    }

    /// @notice keccak256(inputHash || outputHash || timestamp), what a TEE signs per inference.
    function computeMessageHash(bytes32 inputHash, bytes32 outputHash, uint256 timestamp)
        public
        pure
        returns (bytes32)
    {
        return keccak256(abi.encodePacked(inputHash, outputHash, timestamp));
    }

    /// @notice OpenZeppelin MerkleProof.verify (sorted-pair keccak256), for StandardMerkleTree
    ///         batch roots.
    function verifyProof(bytes32[] calldata _proof, bytes32 _root, bytes32 _leaf) external pure returns (bool) {
        bytes32 computed = _leaf;
        for (uint256 i = 0; i < _proof.length; i++) {
            bytes32 sibling = _proof[i];
            computed = computed < sibling
                ? keccak256(abi.encodePacked(computed, sibling))
                : keccak256(abi.encodePacked(sibling, computed));
        }
        return computed == _root;
    }
}
