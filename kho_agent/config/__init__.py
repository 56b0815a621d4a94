"""kho-agentd's configuration: /etc/kho-agent/agent.conf and its drop-ins (kho-agent.conf(5)).

model.py holds the typed result and its defaults (today's behaviour), parse.py turns the text of
the files into it (pure), load.py finds and reads the files (bounded, regular files only),
window.py is the maintenance window, target.py picks the kernel when prepare names none.
"""

from .load import config_files, load_config
from .model import AgentConfig, Setting
from .parse import parse_config

__all__ = ["AgentConfig", "Setting", "config_files", "load_config", "parse_config"]
