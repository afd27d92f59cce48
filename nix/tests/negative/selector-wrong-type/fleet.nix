# Selector values of the wrong kind: a tag string instead of a list, and a string
# for `all`.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  disruptionBudgets = [
    { selector.tags = "db"; maxInFlight = 1; }
    { selector.and = [ { all = "yes"; } ]; maxInFlight = 1; }
  ];
}
