# `tag` for `tags`: release would ignore the unknown key and see an empty selector;
# in Nix it is named for what it is, a typo.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  disruptionBudgets = [ { selector.tag = [ "db" ]; maxInFlight = 1; } ];
}
