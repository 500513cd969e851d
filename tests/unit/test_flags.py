"""Flags keep the reference names and defaults; bad values exit 2 naming the flag."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bpf.preflight import bpffs_problem, kernel_problem
from common.flags import Settings, parse_bind_addr, parse_settings


def test_reference_defaults() -> None:
    s = parse_settings("t", "t", [], env={})
    assert s == Settings()
    assert (
        s.enable_network_policy,
        s.enable_policy_event_logs,
        s.enable_cloudwatch_logs,
        s.enable_ipv6,
    ) == (False, False, False, False)
    assert s.log_level == "debug"
    assert s.log_file == "/var/log/aws-routed-eni/network-policy-agent.log"
    assert (s.conntrack_cache_cleanup_period, s.conntrack_cache_table_size) == (300, 524288)
    assert (s.metrics_bind_addr, s.health_probe_bind_addr) == (":8162", ":8163")
    assert s.enforcing_mode == "standard"


def test_flags_and_environment() -> None:
    s = parse_settings(
        "t",
        "t",
        [
            "--enable-network-policy=true",
            "--enable-policy-event-logs",
            "--log-level=info",
            "--conntrack-cache-table-size=32768",
            "--pod-interface-prefixes=eni, cali",
        ],
        env={"NETWORK_POLICY_ENFORCING_MODE": "Strict", "MY_NODE_NAME": "ip-10-0-0-1"},
    )
    assert s.enable_network_policy
    assert s.enable_policy_event_logs
    assert s.enforcing_mode == "strict"
    assert s.node_name == "ip-10-0-0-1"
    assert s.pod_interface_prefixes == ("eni", "cali")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        pytest.param(
            ["--conntrack-cache-table-size=1000"],
            {},
            "invalid --conntrack-cache-table-size='1000'",
            id="table size too small",
        ),
        pytest.param(
            ["--conntrack-cache-table-size=2000000"],
            {},
            "invalid --conntrack-cache-table-size='2000000'",
            id="table size too big",
        ),
        pytest.param(["--log-level=verbose"], {}, "invalid --log-level='verbose'", id="log level"),
        pytest.param(
            ["--metrics-bind-addr=:99999"],
            {},
            "invalid --metrics-bind-addr",
            id="port out of range",
        ),
        pytest.param(
            [],
            {"NETWORK_POLICY_ENFORCING_MODE": "lenient"},
            "invalid NETWORK_POLICY_ENFORCING_MODE='lenient'",
            id="enforcing mode",
        ),
        pytest.param(
            ["--enable-cloudwatch-logs=true"],
            {},
            "invalid --enable-cloudwatch-logs=true: needs --enable-policy-event-logs",
            id="cloudwatch without event logs",
        ),
        pytest.param(
            ["--enable-network-policy=maybe"], {}, "--enable-network-policy", id="not a boolean"
        ),
    ],
)
def test_bad_values_exit_2_naming_the_flag(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings("np-agent", "t", argv, env=env)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_the_agent_binary_refuses_bad_flags_and_a_missing_node_name() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "agent", "--conntrack-cache-table-size=5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "--conntrack-cache-table-size" in bad.stderr
    no_node = subprocess.run(
        [sys.executable, "-m", "agent", "--enable-network-policy=true"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert no_node.returncode == 2
    assert "--node-name" in no_node.stderr


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (":8162", ("", 8162)),
        ("8163", ("", 8163)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("[::1]:80", ("::1", 80)),
    ],
)
def test_bind_addresses(text: str, expect: tuple[str, int]) -> None:
    assert parse_bind_addr(text) == expect


def test_preflight_messages(tmp_path: object) -> None:
    assert kernel_problem("6.1.0-13-amd64") is None
    old = kernel_problem("5.4.0-150-generic")
    assert old is not None
    assert "5.15 or later" in old
    problem = bpffs_problem(str(tmp_path), try_mount=False)
    assert problem is not None
    assert problem.startswith("bpffs is not mounted at")
    assert "mount -t bpf" in problem


def test_conntrack_bounds_agree_with_the_datapath() -> None:
    """common does not import bpf (the dependency runs bpf -> common): the flag's
    bounds are literals, held equal to bpf/np.h's here."""
    from bpf import layout
    from common import flags

    assert (flags.CT_MIN_ENTRIES, flags.CT_MAX_ENTRIES) == (
        layout.NP_CT_MIN_ENTRIES,
        layout.NP_CT_MAX_ENTRIES,
    )


def test_every_setting_is_a_flag_with_its_reason() -> None:
    """Flags are generated from the Settings fields: none is declared twice, and
    --help shows each field's reason."""
    from common.flags import ENV_ONLY, Settings, parser

    p = parser("np-test", "test")
    by_dest = {
        a.dest: a for a in p._actions if not a.option_strings[0].startswith("--log-file-max")
    }
    for field, info in Settings.model_fields.items():
        if field in ENV_ONLY:
            assert field not in by_dest
            continue
        action = by_dest[field]
        assert f"--{field.replace('_', '-')}" in action.option_strings
        assert info.description
        assert action.help == info.description.replace("%", "%%")


def test_the_reference_flags_without_meaning_here_are_accepted_and_checked() -> None:
    s = parse_settings(
        "np-agent", "", ["--max-concurrent-reconciles=3", "--enable-profiling=false"], env={}
    )
    assert s.enable_network_policy is False
    with pytest.raises(SystemExit) as exit_:
        parse_settings("np-agent", "", ["--max-concurrent-reconciles=0"], env={})
    assert exit_.value.code == 2
