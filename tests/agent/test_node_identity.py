"""The node's name: config ``hostname`` > ``$NODE_NAME`` (downward API) > the host name."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from rooftop.agent.batcher import Batcher
from rooftop.agent.config import load_config
from rooftop.common.errors import ConfigError


def reported_host(cfg) -> str:
    """The Batch.hostname (host.name) an agent with ``cfg`` sends, as the daemon builds it."""
    return Batcher(cfg.agent_id, "boot", hostname=cfg.hostname or None).hostname


def test_node_name_from_the_downward_api_names_the_node_and_the_agent():
    cfg = load_config(env={"NODE_NAME": "gpu-node-7"})
    assert reported_host(cfg) == "gpu-node-7"
    assert cfg.agent_id == "gpu-node-7"  # not the pod's generated host name


def test_configured_hostname_and_agent_id_win_over_node_name(tmp_path: Path):
    path = tmp_path / "agent.toml"
    path.write_text('hostname = "from-file"\n')
    cfg = load_config(path, env={"NODE_NAME": "gpu-node-7", "ROOFTOP_AGENT_ID": "agent-x"})
    assert reported_host(cfg) == "from-file"
    assert cfg.agent_id == "agent-x"
    cfg = load_config(env={"NODE_NAME": "gpu-node-7", "ROOFTOP_HOSTNAME": "from-env"})
    assert reported_host(cfg) == "from-env"
    assert cfg.agent_id == "gpu-node-7"


def test_without_node_name_the_machines_host_name_is_used():
    cfg = load_config(env={})
    assert reported_host(cfg) == socket.gethostname()
    assert cfg.agent_id == socket.gethostname()
    assert reported_host(load_config(env={"NODE_NAME": "  "})) == socket.gethostname()


def test_a_node_name_with_spaces_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"^NODE_NAME: 'gpu node' is not a node name"):
        load_config(env={"NODE_NAME": "gpu node"})
