"""What a run IS: the schema (schema.py), its checks (checks.py), and its composition from the
config tree `conf/` (compose.py); docs/config.md."""
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"  # the config tree: conf/<group>/<option>.yaml
