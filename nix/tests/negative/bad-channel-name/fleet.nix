# Channel names release would refuse: names become file names and URL path segments.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  channels = example.channels // {
    "../edge" = example.channels.stable;
    ".hidden" = example.channels.stable;
  };
}
