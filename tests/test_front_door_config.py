"""The front door's configuration: one template, rendered for every deployment, accepted by
the real envoy binary (``--mode validate``). No server runs here; test_front_door.py sends
traffic through it."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import envoy_validate

from gpt2_triton.front_door import (
    FrontDoorError,
    FrontDoorSettings,
    envoy_binary,
    main,
    render_config,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "settings",
    [
        FrontDoorSettings(),
        FrontDoorSettings(api_key="k1", admin_key="a1", host="0.0.0.0"),
        FrontDoorSettings(
            triton_address="triton",
            gateway_address="openai",
            host="0.0.0.0",
            public_without_key=True,
        ),
    ],
    ids=["loopback", "keys", "container"],
)
def test_every_rendering_is_a_config_envoy_accepts(settings, tmp_path):
    config = tmp_path / "envoy.yaml"
    config.write_text(render_config(replace(settings, admin_socket=str(tmp_path / "admin.sock"))))
    envoy_validate(config)
    clusters = yaml.safe_load(config.read_text())["static_resources"]["clusters"]
    kinds = {c["type"] for c in clusters}
    assert kinds == ({"STRICT_DNS"} if settings.triton_address == "triton" else {"STATIC"})


def test_a_public_address_needs_an_api_key():
    with pytest.raises(FrontDoorError, match="API_KEY"):
        FrontDoorSettings(host="0.0.0.0")
    FrontDoorSettings(host="::1")  # loopback: no key needed


def test_keys_cannot_break_out_of_the_config():
    with pytest.raises(FrontDoorError, match="quotes"):
        FrontDoorSettings(api_key='k" }')
    for key in ("sécret", "k\tey", "key\n"):  # what no client can send as it is
        with pytest.raises(FrontDoorError, match="printable ASCII"):
            FrontDoorSettings(api_key=key)


def test_the_longest_key_allowed_is_one_envoy_accepts(tmp_path):
    """The API key sits in an RE2 regex, which the template's program-size guard refuses
    from ~990 characters: a longer key is refused here, with its reason, not by Envoy."""
    from gpt2_triton.front_door import MAX_KEY_CHARS

    longest = "k" * MAX_KEY_CHARS
    settings = FrontDoorSettings(api_key=longest, admin_socket=str(tmp_path / "admin.sock"))
    config = tmp_path / "envoy.yaml"
    config.write_text(render_config(settings))
    envoy_validate(config)
    for name in ("api_key", "admin_key"):
        with pytest.raises(FrontDoorError, match=f"at most {MAX_KEY_CHARS} characters"):
            FrontDoorSettings(**{name: longest + "k"})


def test_a_key_with_regex_characters_matches_itself_only(tmp_path):
    """The key is matched within a regex (the scheme in any case): its own characters are
    escaped, so "k.+" is no pattern that "kXYZ" passes."""
    import re

    key = "k.+*?(x)|[y]{2}^$"
    settings = FrontDoorSettings(api_key=key, admin_socket=str(tmp_path / "admin.sock"))
    config = tmp_path / "envoy.yaml"
    config.write_text(render_config(settings))
    envoy_validate(config)

    def key_patterns(node):  # every header matcher on "authorization", wherever it is
        if isinstance(node, dict):
            if node.get("name") == "authorization":
                yield node["string_match"]["safe_regex"]["regex"]
            node = list(node.values())
        if isinstance(node, list):
            for item in node:
                yield from key_patterns(item)

    [pattern] = set(key_patterns(yaml.safe_load(config.read_text())))
    assert re.fullmatch(pattern, f"Bearer {key}") and re.fullmatch(pattern, f"bearer  {key}")
    for wrong in ("Bearer kXYZ(x)|[y]{2}^$", f"Bearer {key}x", "Bearer k", key):
        assert not re.fullmatch(pattern, wrong), wrong


def test_without_an_admin_key_the_admin_apis_are_closed_at_both_layers():
    closed = FrontDoorSettings(admin_socket="/tmp/admin.sock")
    other = FrontDoorSettings()
    # an unguessable key per server, the same one for Envoy and Triton
    assert closed.effective_admin_key != other.effective_admin_key
    assert len(closed.effective_admin_key) >= 32
    assert closed.effective_admin_key in render_config(closed)
    assert all(closed.effective_admin_key in flag for flag in closed.triton_restrictions())
    assert "closed on this server" in render_config(closed)


def test_triton_s_statistics_api_is_open_on_loopback_only_when_asked():
    """perf_analyzer cannot send the admin key over gRPC: ``--open-triton-statistics``
    leaves that one API open on Triton's ports; the others stay restricted, and the door
    keeps statistics behind the key either way."""
    for settings, statistics_restricted in (
        (FrontDoorSettings(admin_socket="/tmp/admin.sock"), True),
        (FrontDoorSettings(admin_socket="/tmp/admin.sock", triton_statistics_open=True), False),
    ):
        for flag in settings.triton_restrictions():
            apis = flag.split("=", 1)[1].split(":", 1)[0].split(",")
            assert ("statistics" in apis) == statistics_restricted, flag
            assert {"model-repository", "trace", "logging", "shared-memory"} <= set(apis)
        flipped = replace(settings, triton_statistics_open=not settings.triton_statistics_open)
        assert render_config(settings) == render_config(flipped)  # the door: unchanged


def test_the_compose_front_door_renders_the_same_template(tmp_path):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["front-door"]
    command = service["command"]
    assert command[:3] == ["python3", "-m", "gpt2_triton.front_door"]
    args = [a for a in command[3:] if a != "--run"]  # render only; do not become envoy
    out = tmp_path / "envoy.yaml"
    args[args.index("--out") + 1] = str(out)
    assert main(args) == 0
    envoy_validate(out)
    assert service["restart"] == "unless-stopped" and service["healthcheck"]["test"]
    for name in ("triton", "triton-cpu"):  # Triton is reached through the front door only
        ports = compose["services"][name].get("ports", [])
        assert all(":8000" not in p and ":8001" not in p for p in ports), ports
        assert compose["services"][name]["restart"] == "unless-stopped"


def test_envoy_is_installed():
    assert envoy_binary().is_file() or shutil.which("envoy")


def test_the_admin_interface_is_a_socket_only_its_owner_opens(tmp_path):
    """Envoy's admin interface shows every key: no TCP port, a socket of mode 0600."""
    admin = yaml.safe_load(
        render_config(FrontDoorSettings(admin_socket=str(tmp_path / "admin.sock")))
    )["admin"]
    assert admin["address"] == {"pipe": {"path": str(tmp_path / "admin.sock"), "mode": 0o600}}


def test_paths_with_quotes_and_backslashes_stay_themselves(tmp_path):
    folder = tmp_path / 'logs "a"\\tb'
    folder.mkdir()
    settings = FrontDoorSettings(
        admin_socket=str(folder / "admin.sock"), access_log=str(folder / "access.log")
    )
    config = tmp_path / "envoy.yaml"
    config.write_text(render_config(settings))
    envoy_validate(config)
    loaded = yaml.safe_load(config.read_text())
    assert loaded["admin"]["address"]["pipe"]["path"] == settings.admin_socket
    listener = loaded["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["access_log"][0]["typed_config"]["path"] == settings.access_log


def test_replicas_are_one_endpoint_each_in_both_clusters(tmp_path):
    settings = FrontDoorSettings(
        admin_socket=str(tmp_path / "admin.sock"), replica_ports=((9100, 9101), (9110, 9111))
    )
    config = tmp_path / "envoy.yaml"
    config.write_text(render_config(settings))
    envoy_validate(config)
    clusters = {
        c["name"]: c for c in yaml.safe_load(config.read_text())["static_resources"]["clusters"]
    }
    for name, ports in (("triton_http", [9100, 9110]), ("triton_grpc", [9101, 9111])):
        endpoints = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == (
            ports
        )
        assert clusters[name]["lb_policy"] == "LEAST_REQUEST"
    grpc = clusters["triton_grpc"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["health_check_config"]["port_value"] for e in grpc] == [9100, 9110]
    with pytest.raises(FrontDoorError, match="overlap"):
        FrontDoorSettings(replica_ports=((9100, 9101), (9101, 9111)))
