"""Settings: one TOML file plus ``PACSBRIDGE_<KEY>`` environment overrides, validated once at start.

Precedence (highest first): environment variables, the TOML file, built-in defaults.  The file
comes from ``--config`` or ``PACSBRIDGE_CONFIG``, else ``/etc/pacsbridge/pacsbridge.toml`` when it
exists; without one the defaults run the daemon with SQLite in ``./var`` and the shipped model.
"""


from .destination import Destination
from .loading import DEFAULT_CONFIG_FILE, PATH_KEYS, ConfigError, config_path, load_settings
from .roles import ROLES, NodeRole, parse_roles
from .settings import DEFAULT_MODEL, Settings

__all__ = ["DEFAULT_CONFIG_FILE", "DEFAULT_MODEL", "PATH_KEYS", "ROLES", "ConfigError", "Destination", "NodeRole", "Settings",
           "config_path", "load_settings", "parse_roles"]
