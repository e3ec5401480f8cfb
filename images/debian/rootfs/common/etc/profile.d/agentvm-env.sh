# Exports the KEY=VALUE lines of the VM's env (the agentvm.env credential or
# /etc/agentvm/env, published to /run/agentvm/env at boot and whenever
# /etc/agentvm/env changes, readable by root only) into login shells.
# Values are taken literally, not evaluated by the shell.
if [ -r /run/agentvm/env ]; then
	while IFS= read -r agentvm_line || [ -n "$agentvm_line" ]; do
		case $agentvm_line in
		'' | '#'*) ;;
		[A-Za-z_]*=*) export "$agentvm_line" 2>/dev/null || true ;;
		esac
	done </run/agentvm/env
	unset agentvm_line
fi
