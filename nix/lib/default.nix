# The nixfleet Nix library. Builtins only: importing it needs no nixpkgs.
#   mkFleet     fleet description -> { resolved; hostConfigurations; revocations; warnings;
#               compliance; } (compliance: the library its release gate uses, the
#               fleet's `compliance` argument or lib.compliance)
#   mergeFleets [ fleet … ] -> fleet (a name defined twice is an error)
let
  fleet = import ./mk-fleet.nix;
in
{
  inherit (fleet) mkFleet mergeFleets;
  compliance = import ./compliance; # controls as data: docs/compliance.md
}
