# Evaluates one test fixture to its fleet.resolved. A fixture's fleet.nix is a fleet
# description, or a function of the library for fixtures that need it
# (`{ mergeFleets, ... }: mergeFleets [ … ]`).
#
#   nix-instantiate --eval --strict --json nix/tests/eval.nix \
#     --arg fixture ./nix/tests/positive/example/fleet.nix
#
# `fixture` may also be an absolute path given as a string (--argstr), which is how the
# Rust test passes it; `--argstr attr warnings` gives mkFleet's warnings instead.
{
  fixture,
  attr ? "resolved",
}:
let
  lib = import ../lib;
  fleet = import fixture;
in
(lib.mkFleet (if builtins.isFunction fleet then fleet lib else fleet)).${attr}
