"""`load_settings`: defaults, errors that name the variable and never echo secrets, TOML file."""

from __future__ import annotations

import dataclasses
import os
import re
from decimal import Decimal
from pathlib import Path

import pytest
from eth_account import Account

from facilitator.config import ConfigError, Settings, load_settings
from facilitator.protocol.networks import BASE_SEPOLIA

KEY = "8da4ef21b864d2cc526dbdb2a120bd2874c36c9d0a1fb7f8c63d7f7a8b41de8f"
DB = "postgresql://facilitator:Sup3rS3cretPw@db.internal:5432/facilitator"
RPC = "https://base-sepolia.example.com/v2/ApiKeyZZ9ZZ9secret"
SECRETS = (KEY, "Sup3rS3cretPw", "ApiKeyZZ9ZZ9secret")


def minimal_env(**extra: str) -> dict[str, str]:
    env = {"DATABASE_URL": DB, "FACILITATOR_SIGNER_KEY": KEY, "FACILITATOR_RPC_URLS": RPC}
    env.update(extra)
    return env


def config_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as err:
        load_settings(env)
    message = str(err.value)
    for secret in SECRETS:
        assert secret not in message, f"secret leaked into: {message}"
    return message


def test_minimal_env_loads_with_defaults() -> None:
    s = load_settings(minimal_env())
    assert (s.host, s.port) == ("127.0.0.1", 4022)
    assert s.database_url.reveal() == DB
    assert s.signer_key.address == Account.from_key(bytes.fromhex(KEY)).address
    assert len(s.networks) == 1
    net = s.networks[0]
    assert net.network.chain_id == BASE_SEPOLIA.chain_id == 84532
    assert net.network.assets == BASE_SEPOLIA.assets
    assert net.network.confirmations == BASE_SEPOLIA.confirmations
    assert [u.reveal() for u in net.rpc_urls] == [RPC]
    assert (s.log_level, s.log_format) == ("INFO", "json")


def test_loaded_defaults_equal_settings_dataclass_defaults() -> None:
    s = load_settings(minimal_env())
    for f in dataclasses.fields(Settings):
        if f.default is not dataclasses.MISSING and f.name != "secrets":
            assert getattr(s, f.name) == f.default, f.name


def test_settings_repr_hides_secrets() -> None:
    text = repr(load_settings(minimal_env()))
    assert not any(secret in text for secret in SECRETS)


def test_secrets_tuple_lists_values_to_redact() -> None:
    s = load_settings(minimal_env(FACILITATOR_RPC_URLS=f"{RPC}, https://b.example/k2"))
    assert set(s.secrets) >= {DB, RPC, "https://b.example/k2"}


def test_rpc_urls_split_on_commas() -> None:
    s = load_settings(minimal_env(FACILITATOR_RPC_URLS=f" {RPC} ,https://b.example ,"))
    assert [u.reveal() for u in s.networks[0].rpc_urls] == [RPC, "https://b.example"]


# ---- errors name the variable, never the secret -------------------------------------------------

def _without(var: str) -> dict[str, str]:
    env = minimal_env()
    del env[var]
    return env


BAD_ENVS = {
    "DATABASE_URL missing": (_without("DATABASE_URL"), "DATABASE_URL"),
    "DATABASE_URL blank": (minimal_env(DATABASE_URL="   "), "DATABASE_URL"),
    "port abc": (minimal_env(FACILITATOR_PORT="abc"), "FACILITATOR_PORT"),
    "port 70000": (minimal_env(FACILITATOR_PORT="70000"), "FACILITATOR_PORT"),
    "port 0": (minimal_env(FACILITATOR_PORT="0"), "FACILITATOR_PORT"),
    "rpc missing": (_without("FACILITATOR_RPC_URLS"), "FACILITATOR_RPC_URLS"),
    "rpc ftp": (minimal_env(FACILITATOR_RPC_URLS="ftp://x"), "FACILITATOR_RPC_URLS"),
    "rpc second ftp": (minimal_env(FACILITATOR_RPC_URLS=f"{RPC},ftp://u:ApiKeyZZ9ZZ9secret@x"),
                       "FACILITATOR_RPC_URLS"),
    "signer key missing": (_without("FACILITATOR_SIGNER_KEY"), "FACILITATOR_SIGNER_KEY"),
    "signer key 63 digits": (minimal_env(FACILITATOR_SIGNER_KEY=KEY[:-1]),
                             "FACILITATOR_SIGNER_KEY"),
    "signer key not hex": (minimal_env(FACILITATOR_SIGNER_KEY=KEY[:-2] + "zz"),
                           "FACILITATOR_SIGNER_KEY"),
    "signer key too long": (minimal_env(FACILITATOR_SIGNER_KEY=KEY + "ab"),
                            "FACILITATOR_SIGNER_KEY"),
    "signer key file missing": (
        {**_without("FACILITATOR_SIGNER_KEY"), "FACILITATOR_SIGNER_KEY_FILE": "/nonexistent/k"},
        "FACILITATOR_SIGNER_KEY_FILE"),
    "receipt timeout -1": (minimal_env(FACILITATOR_RECEIPT_TIMEOUT_S="-1"),
                           "FACILITATOR_RECEIPT_TIMEOUT_S"),
    "receipt timeout nan": (minimal_env(FACILITATOR_RECEIPT_TIMEOUT_S="nan"),
                            "FACILITATOR_RECEIPT_TIMEOUT_S"),
    "log format xml": (minimal_env(FACILITATOR_LOG_FORMAT="xml"), "FACILITATOR_LOG_FORMAT"),
    "log level chatty": (minimal_env(FACILITATOR_LOG_LEVEL="CHATTY"), "FACILITATOR_LOG_LEVEL"),
    "gas cap tiny": (minimal_env(FACILITATOR_GAS_LIMIT_CAP="100"), "FACILITATOR_GAS_LIMIT_CAP"),
    "pool size 1": (minimal_env(FACILITATOR_DB_POOL_SIZE="1"), "FACILITATOR_DB_POOL_SIZE"),
    "config file missing": (minimal_env(FACILITATOR_CONFIG="/nonexistent/f.toml"),
                            "FACILITATOR_CONFIG"),
}


@pytest.mark.parametrize(("env", "var"), list(BAD_ENVS.values()), ids=list(BAD_ENVS))
def test_invalid_setting_error_names_variable_without_secrets(env: dict[str, str],
                                                              var: str) -> None:
    assert var in config_error(env)


def test_signer_key_file_readable_by_others_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(KEY)
    os.chmod(path, 0o644)
    env = {**_without("FACILITATOR_SIGNER_KEY"), "FACILITATOR_SIGNER_KEY_FILE": str(path)}
    assert "FACILITATOR_SIGNER_KEY_FILE" in config_error(env)


def test_signer_key_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("0x" + KEY + "\n")
    os.chmod(path, 0o600)
    env = {**_without("FACILITATOR_SIGNER_KEY"), "FACILITATOR_SIGNER_KEY_FILE": str(path)}
    assert load_settings(env).signer_key.address == Account.from_key(bytes.fromhex(KEY)).address


@pytest.mark.parametrize("gwei", ["1.001", "0.3", "2.5", "0.000000001", "7.77"])
def test_gwei_settings_convert_exactly_to_wei(gwei: str) -> None:
    s = load_settings(minimal_env(FACILITATOR_MAX_FEE_GWEI=gwei,
                                  FACILITATOR_PRIORITY_FEE_GWEI=gwei))
    expected = int(Decimal(gwei) * 10**9)
    assert (s.max_fee_per_gas_cap_wei, s.priority_fee_wei) == (expected, expected)


# ---- TOML file -----------------------------------------------------------------------------------

def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "facilitator.toml"
    path.write_text(text)
    return str(path)


SETTINGS_TOML = """
[server]
host = "0.0.0.0"
port = 5000
[settlement]
receipt_timeout_s = 3.5
gas_limit_cap = 250000
[logging]
format = "text"
level = "DEBUG"
"""


def test_toml_sets_non_secret_values(tmp_path: Path) -> None:
    s = load_settings(minimal_env(FACILITATOR_CONFIG=_toml(tmp_path, SETTINGS_TOML)))
    assert (s.host, s.port, s.receipt_timeout_s, s.gas_limit_cap) == ("0.0.0.0", 5000, 3.5, 250000)
    assert (s.log_format, s.log_level) == ("text", "DEBUG")


def test_env_overrides_toml(tmp_path: Path) -> None:
    s = load_settings(minimal_env(FACILITATOR_CONFIG=_toml(tmp_path, SETTINGS_TOML),
                                  FACILITATOR_PORT="6000", FACILITATOR_LOG_FORMAT="json"))
    assert (s.port, s.log_format, s.host) == (6000, "json", "0.0.0.0")


@pytest.mark.parametrize("text", [
    f'database_url = "{DB}"\n',
    f'signer_key = "{KEY}"\n',
    f'[server]\nsigner_key = "{KEY}"\n',
    f'[[networks]]\nkey = "x"\nrpc_urls = ["{RPC}"]\n',
], ids=["database_url", "signer_key", "nested signer_key", "rpc_urls"])
def test_toml_with_secrets_is_refused(tmp_path: Path, text: str) -> None:
    message = config_error(minimal_env(FACILITATOR_CONFIG=_toml(tmp_path, text)))
    assert "FACILITATOR_CONFIG" in message


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    assert "FACILITATOR_CONFIG" in config_error(
        minimal_env(FACILITATOR_CONFIG=_toml(tmp_path, "[server\nport = 1\n")))


def test_invalid_toml_value_names_the_toml_key(tmp_path: Path) -> None:
    message = config_error(minimal_env(FACILITATOR_CONFIG=_toml(tmp_path, "[server]\nport = 0\n")))
    assert "server.port" in message


def test_invalid_toml_choice_names_the_toml_key(tmp_path: Path) -> None:
    """The module promises a message naming 'the variable (or TOML key)'. For a bad
    `logging.format` in the file, the message names only FACILITATOR_LOG_FORMAT (not set
    anywhere), so the operator is sent looking in the wrong place."""
    message = config_error(
        minimal_env(FACILITATOR_CONFIG=_toml(tmp_path, '[logging]\nformat = "xml"\n')))
    assert "logging.format" in message


NETWORKS_TOML = """
[[networks]]
key = "devnet"
chain_id = 31337
v1_name = "devnet"
confirmations = 2
[[networks.assets]]
address = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
name = "USDC"
version = "2"
decimals = 6
symbol = "USDC"
"""


def test_toml_networks_definition(tmp_path: Path) -> None:
    env = minimal_env(FACILITATOR_CONFIG=_toml(tmp_path, NETWORKS_TOML),
                      FACILITATOR_RPC_URLS_DEVNET="http://127.0.0.1:8545")
    (net,) = load_settings(env).networks
    assert (net.network.key, net.network.chain_id, net.network.v1_name,
            net.network.confirmations) == ("devnet", 31337, "devnet", 2)
    (asset,) = net.network.assets
    assert asset.address == "0x5fbdb2315678afecb367f032d93f642f64180aa3"
    assert (asset.eip712_name, asset.eip712_version, asset.decimals) == ("USDC", "2", 6)
    assert [u.reveal() for u in net.rpc_urls] == ["http://127.0.0.1:8545"]


def test_toml_network_without_its_rpc_variable_names_it(tmp_path: Path) -> None:
    env = minimal_env(FACILITATOR_CONFIG=_toml(tmp_path, NETWORKS_TOML))
    assert "FACILITATOR_RPC_URLS_DEVNET" in config_error(env)


@pytest.mark.parametrize(("edit", "where"), [
    (('chain_id = 31337', 'chain_id = "31337"'), "networks[0].chain_id"),
    (('key = "devnet"', 'key = "Dev Net"'), "networks[0].key"),
    (('address = "0x5FbDB2315678afecb367f032d93F642f64180aa3"', 'address = "0x5fbdb2"'),
     "networks[0].assets[0].address"),
    (('name = "USDC"', 'name = ""'), "networks[0].assets[0].name"),
])
def test_toml_network_errors_name_the_key(tmp_path: Path, edit: tuple[str, str],
                                          where: str) -> None:
    text = NETWORKS_TOML.replace(*edit)
    env = minimal_env(FACILITATOR_CONFIG=_toml(tmp_path, text),
                      FACILITATOR_RPC_URLS_DEVNET="http://127.0.0.1:8545")
    assert where in config_error(env)


# ---- FACILITATOR_CONFIRMATIONS over networks[].confirmations (environment > TOML) ---------------

def test_confirmations_variable_overrides_the_toml_networks(tmp_path: Path) -> None:
    env = minimal_env(FACILITATOR_CONFIG=_toml(tmp_path, NETWORKS_TOML),
                      FACILITATOR_RPC_URLS_DEVNET="http://127.0.0.1:8545")
    assert load_settings(env).networks[0].network.confirmations == 2  # the TOML value
    env["FACILITATOR_CONFIRMATIONS"] = "3"
    assert load_settings(env).networks[0].network.confirmations == 3


@pytest.mark.parametrize("value", ["abc", "-1", "10001", "1e3"])
@pytest.mark.parametrize("with_toml", [True, False], ids=["toml networks", "built-in network"])
def test_invalid_confirmations_variable_fails_naming_it(tmp_path: Path, value: str,
                                                        with_toml: bool) -> None:
    env = minimal_env(FACILITATOR_CONFIRMATIONS=value)
    if with_toml:
        env.update(FACILITATOR_CONFIG=_toml(tmp_path, NETWORKS_TOML),
                   FACILITATOR_RPC_URLS_DEVNET="http://127.0.0.1:8545")
    assert "FACILITATOR_CONFIRMATIONS" in config_error(env)


def test_toml_choice_of_a_wrong_type_names_the_key(tmp_path: Path) -> None:
    message = config_error(minimal_env(FACILITATOR_CONFIG=_toml(
        tmp_path, "[watcher]\nenabled = false\n")))
    assert "watcher.enabled" in message


def test_crosscheck_settings_are_read_as_the_service_reads_them(tmp_path: Path) -> None:
    from facilitator.config import crosscheck_settings

    toml = _toml(tmp_path, "[og]\nchain_id = 777\nsettle_window_s = 60\n")
    shared = crosscheck_settings({"FACILITATOR_CONFIG": toml})
    assert (shared.og_chain_id, shared.settle_window_s) == (777, 60.0)
    shared = crosscheck_settings({"FACILITATOR_CONFIG": toml, "FACILITATOR_OG_CHAIN_ID": "5"})
    assert shared.og_chain_id == 5
    assert crosscheck_settings({}).og_chain_id == 10740
    with pytest.raises(ConfigError, match="FACILITATOR_ATTESTATION_SETTLE_WINDOW_S"):
        crosscheck_settings({"FACILITATOR_ATTESTATION_SETTLE_WINDOW_S": "0"})


def test_unused_facilitator_variables_are_reported() -> None:
    s = load_settings(minimal_env(FACILITATOR_WATCHER_POLL_S="0.05",
                                  FACILITATOR_OG_SIGNER_KEY=KEY, FACILITATOR_PG_BACKEND="debian",
                                  FACILITATOR_PORT="4100", OTHER_TOOL_SETTING="x"))
    assert s.unused_env == (
        "FACILITATOR_OG_SIGNER_KEY",  # the OpenGradient part is off: nothing reads it
        "FACILITATOR_WATCHER_POLL_S")  # misspelt: the setting is ..._POLL_INTERVAL_S
    assert load_settings(minimal_env()).unused_env == ()


def test_every_documented_variable_is_read() -> None:
    """The README's settings table names only variables the configuration reads (with the
    OpenGradient part and its relay on, so its variables are read too)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    documented = set(re.findall(r"^\| `(FACILITATOR_[A-Z0-9_]+)`", readme, re.MULTILINE))
    env = minimal_env(FACILITATOR_OG_RPC_URLS="http://127.0.0.1:1",
                      FACILITATOR_DATA_RELAY="on", FACILITATOR_OG_SIGNER_KEY=KEY,
                      FACILITATOR_BLOBSTORE_URL="http://127.0.0.1:2",
                      **{v: "0x" + "11" * 20 for v in ("FACILITATOR_TEE_REGISTRY",
                                                       "FACILITATOR_SETTLEMENT_RELAY",
                                                       "FACILITATOR_SETTLEMENT_RELAYER")})
    documented.discard("FACILITATOR_SIGNER_KEY_FILE")  # the alternative to ..._SIGNER_KEY
    env.update({name: "" for name in documented if name not in env})  # "" reads as unset
    unused = set(load_settings(env).unused_env)
    assert not unused & documented, sorted(unused & documented)
