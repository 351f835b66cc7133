// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

/// @title OPGToken
/// @notice Devnet stand-in for OpenGradient's OPG ERC-20 on Base Sepolia
///         (0x240b09731D96979f50B2C649C9CE10FcF9C7987F): 18 decimals, EIP-2612 `permit` with
///         `nonces` and `DOMAIN_SEPARATOR`, EIP-712 domain name "OPG" / version "2" (as the
///         OpenGradient gateway advertises in `extra`), EIP-5267 `eip712Domain()`, owner/minter
///         `mint`. x402 `upto` payments move it through Permit2 (the payer approves Permit2 once).
/// @dev The real token's source is not public; errors and allowance semantics follow
///      OpenZeppelin v5 ERC20/ERC20Permit (custom errors, a max allowance is never decremented,
///      `transferFrom` emits no Approval). Like TestUSDC it is setCode-friendly: no constructor,
///      no immutables, configuration written once by `initialize`, domain separator computed at
///      call time. Not for real value: `initialize` is open to the first caller.
contract OPGToken {
    bytes32 private constant EIP712_DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 public constant PERMIT_TYPEHASH =
        keccak256("Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)");
    uint256 private constant HALF_CURVE_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    string public name;
    string public symbol;
    string private _version;
    uint8 public decimals;
    bool public initialized;
    address public owner;
    uint256 public totalSupply;
    mapping(address => uint256) public balanceOf;
    mapping(address => mapping(address => uint256)) public allowance;
    mapping(address => bool) public isMinter;
    mapping(address => uint256) public nonces;

    event Transfer(address indexed from, address indexed to, uint256 value);
    event Approval(address indexed owner, address indexed spender, uint256 value);
    event MinterConfigured(address indexed minter, bool enabled);
    event EIP712DomainChanged();

    // OpenZeppelin v5 errors (IERC20Errors, ERC20Permit, ECDSA, Ownable, Initializable).
    error ERC20InsufficientBalance(address sender, uint256 balance, uint256 needed);
    error ERC20InvalidSender(address sender);
    error ERC20InvalidReceiver(address receiver);
    error ERC20InsufficientAllowance(address spender, uint256 allowance, uint256 needed);
    error ERC20InvalidApprover(address approver);
    error ERC20InvalidSpender(address spender);
    error ERC2612ExpiredSignature(uint256 deadline);
    error ERC2612InvalidSigner(address signer, address owner);
    error ECDSAInvalidSignature();
    error ECDSAInvalidSignatureS(bytes32 s);
    error OwnableUnauthorizedAccount(address account);
    error OwnableInvalidOwner(address owner);
    error InvalidInitialization();
    /// @notice `mint` by an account that is neither the owner nor a configured minter.
    error UnauthorizedMinter(address account);

    // ---- setup ----

    function initialize(
        string calldata tokenName,
        string calldata tokenSymbol,
        string calldata tokenVersion,
        uint8 tokenDecimals,
        address tokenOwner
    ) external {
        if (initialized) revert InvalidInitialization();
        if (tokenOwner == address(0)) revert OwnableInvalidOwner(address(0));
        initialized = true;
        name = tokenName;
        symbol = tokenSymbol;
        _version = tokenVersion;
        decimals = tokenDecimals;
        owner = tokenOwner;
        emit EIP712DomainChanged();
    }

    function configureMinter(address minter, bool enabled) external {
        if (msg.sender != owner) revert OwnableUnauthorizedAccount(msg.sender);
        isMinter[minter] = enabled;
        emit MinterConfigured(minter, enabled);
    }

    function mint(address to, uint256 amount) external returns (bool) {
        if (msg.sender != owner && !isMinter[msg.sender]) revert UnauthorizedMinter(msg.sender);
        if (to == address(0)) revert ERC20InvalidReceiver(address(0));
        totalSupply += amount;
        balanceOf[to] += amount;
        emit Transfer(address(0), to, amount);
        return true;
    }

    // ---- ERC-20 ----

    function transfer(address to, uint256 value) external returns (bool) {
        _transfer(msg.sender, to, value);
        return true;
    }

    function approve(address spender, uint256 value) external returns (bool) {
        _approve(msg.sender, spender, value);
        return true;
    }

    function transferFrom(address from, address to, uint256 value) external returns (bool) {
        uint256 allowed = allowance[from][msg.sender];
        if (allowed != type(uint256).max) {
            if (allowed < value) revert ERC20InsufficientAllowance(msg.sender, allowed, value);
            allowance[from][msg.sender] = allowed - value;
        }
        _transfer(from, to, value);
        return true;
    }

    // ---- EIP-712 / EIP-2612 ----

    function version() external view returns (string memory) {
        return _version;
    }

    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(
            abi.encode(EIP712_DOMAIN_TYPEHASH, keccak256(bytes(name)), keccak256(bytes(_version)), block.chainid, address(this))
        );
    }

    function eip712Domain()
        external
        view
        returns (
            bytes1 fields,
            string memory domainName,
            string memory domainVersion,
            uint256 chainId,
            address verifyingContract,
            bytes32 salt,
            uint256[] memory extensions
        )
    {
        return (hex"0f", name, _version, block.chainid, address(this), bytes32(0), new uint256[](0));
    }

    /// @notice EIP-2612: `owner` approves `spender` for `value` with an EIP-712 signature (ECDSA).
    function permit(address holder, address spender, uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
    {
        if (block.timestamp > deadline) revert ERC2612ExpiredSignature(deadline);
        bytes32 structHash = keccak256(abi.encode(PERMIT_TYPEHASH, holder, spender, value, nonces[holder]++, deadline));
        bytes32 digest = keccak256(abi.encodePacked(hex"1901", DOMAIN_SEPARATOR(), structHash));
        if (uint256(s) > HALF_CURVE_ORDER) revert ECDSAInvalidSignatureS(s);
        address signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert ECDSAInvalidSignature();
        if (signer != holder) revert ERC2612InvalidSigner(signer, holder);
        _approve(holder, spender, value);
    }

    // ---- internals ----

    function _transfer(address from, address to, uint256 value) internal {
        if (from == address(0)) revert ERC20InvalidSender(address(0));
        if (to == address(0)) revert ERC20InvalidReceiver(address(0));
        uint256 fromBalance = balanceOf[from];
        if (fromBalance < value) revert ERC20InsufficientBalance(from, fromBalance, value);
        balanceOf[from] = fromBalance - value;
        balanceOf[to] += value;
        emit Transfer(from, to, value);
    }

    function _approve(address holder, address spender, uint256 value) internal {
        if (holder == address(0)) revert ERC20InvalidApprover(address(0));
        if (spender == address(0)) revert ERC20InvalidSpender(address(0));
        allowance[holder][spender] = value;
        emit Approval(holder, spender, value);
    }
}
