# The hosts of a hosts folder: the names of its subfolders that start with
# `agent-` followed by a name, sorted. Plain files (agent-x.nix), symlinks and
# other folders (common/) are not hosts. Neither is agent-template/: it is
# what `agentvm new NAME` copies, and its `@NAME@` placeholders are no valid
# host or user name, so it does not evaluate as a NixOS system.
#
# Builtins only, so it evaluates without nixpkgs:
#   nix-instantiate --eval --strict --json --expr 'import ./hosts/discover.nix ./hosts'
dir:
let
  entries = builtins.readDir dir;
  isHost = name:
    entries.${name} == "directory"
    && builtins.substring 0 6 name == "agent-"
    && builtins.stringLength name > 6
    && name != "agent-template";
in
builtins.sort builtins.lessThan (builtins.filter isHost (builtins.attrNames entries))
