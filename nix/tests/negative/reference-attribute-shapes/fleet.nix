# The reference's descriptive attributes and revocations are accepted, and checked like
# the others: descriptions that are not strings, a revocation without a host and with a
# misspelt attribute.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  tags.web = { description = 5; };
  channels = example.channels // {
    edge = example.channels.edge // { description = [ "lab" ]; };
  };
  revocations = [ { notBefore = "2026-01-01T00:00:00Z"; reasons = "typo"; } ];
}
