# Helpers the nixfleet NixOS modules use to turn options into a systemd command line
# and into trust.json. Builtins only, so that the tests evaluate them without nixpkgs.
let
  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];

  # A path literal goes into the store (public files only: secret options are strings);
  # anything else is taken as written.
  toArg = value: if builtins.isPath value then "${value}" else toString value;

  keyEntry = key: { inherit (key) algorithm public; };
  keySlot = slot: {
    current = keyEntry slot.current;
    previous = if slot.previous == null then null else keyEntry slot.previous;
    rejectBefore = slot.rejectBefore;
  };
in
rec {
  # The flag of an option: "channelRefsArtifactUrl" -> "--channel-refs-artifact-url".
  flagOf = name: "--" + builtins.replaceStrings upper (map (c: "-" + c) lower) name;

  # One ExecStart word. Plain words stay bare; anything else is double-quoted with `\`
  # and `"` escaped, and `%` and `$` doubled so that systemd expands no specifier or
  # variable inside a value (a URL may well contain `%`).
  escapeArg =
    arg:
    if builtins.match "[A-Za-z0-9_./:=@+,-]+" arg != null then
      arg
    else if builtins.replaceStrings [ "\n" "\r" ] [ "" "" ] arg != arg then
      throw "nixfleet: a command-line value contains a line break: ${arg}"
    else
      "\"" + builtins.replaceStrings [ "\\" "\"" "%" "$" ] [ "\\\\" "\\\"" "%%" "$$" ] arg + "\"";

  # `--flag value` for every option in `names` that is set: null is left out (the binary
  # then uses its own default or does without), a list gives the flag once per element.
  # `renamed` maps an option to a flag other than flagOf's (a list option for a repeated
  # flag), `values` replaces an option's value (a credential path instead of the file).
  toArgs =
    {
      names,
      cfg,
      renamed ? { },
      values ? { },
    }:
    builtins.concatLists (
      map (
        name:
        let
          flag = renamed.${name} or (flagOf name);
          value = values.${name} or cfg.${name};
        in
        if value == null then
          [ ]
        else if builtins.isList value then
          builtins.concatLists (map (v: [ flag (toArg v) ]) value)
        else
          [ flag (toArg value) ]
      ) names
    );

  # The ExecStart line: the executable, then each argument escaped.
  command = exe: args: builtins.concatStringsSep " " ([ exe ] ++ map escapeArg args);

  # The port of "host:port" or "[v6]:port", null when there is none.
  portOf =
    listen:
    let
      m = builtins.match ".*:([0-9]+)" listen;
    in
    if m == null then null else builtins.fromJSON (builtins.head m);

  # trust.json (schemaVersion 1, SPEC.md §2) from the nixfleet.trust options.
  trustJson =
    trust:
    builtins.toJSON {
      schemaVersion = 1;
      ciReleaseKey = keySlot trust.ciReleaseKey;
      orgRootKey = keySlot trust.orgRootKey;
      inherit (trust) cacheKeys;
    };
}
