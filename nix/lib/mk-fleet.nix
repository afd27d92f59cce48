# mkFleet and mergeFleets: the fleet described in Nix (SPEC.md §4) becomes the unsigned
# fleet.resolved that `nixfleet release` signs.
#
# Builtins only, so a flake's `lib` evaluates without nixpkgs. Every check mirrors
# crates/nixfleet-cli/src/release.rs, with the same wording where the two overlap: a fleet
# that evaluates here is one that release accepts, and the waves resolved here are the
# waves release writes. The one exception is a rollout policy without waves: the default
# of the reference mkFleet, so it evaluates (with a warning), but release refuses it.
# Errors are collected and thrown together, like release lists every problem rather than
# the first.
let
  inherit (builtins)
    all
    any
    attrNames
    concatLists
    concatMap
    concatStringsSep
    elem
    elemAt
    filter
    foldl'
    genericClosure
    genList
    groupBy
    head
    isAttrs
    isBool
    isFloat
    isFunction
    isInt
    isList
    isPath
    isString
    length
    lessThan
    listToAttrs
    mapAttrs
    removeAttrs
    match
    sort
    toJSON
    toString
    typeOf
    zipAttrsWith
    ;

  # ---------------------------------------------------------------- small helpers
  # (what nixpkgs.lib would give us)

  filterAttrs =
    pred: set:
    listToAttrs (
      concatMap (
        name:
        if pred name set.${name} then
          [
            {
              inherit name;
              value = set.${name};
            }
          ]
        else
          [ ]
      ) (attrNames set)
    );

  imap0 = f: list: genList (i: f i (elemAt list i)) (length list);

  # Index of the first element satisfying pred, else `default`. Stops testing at the
  # first match (pred may be costly), and foldl' keeps the stack flat on long lists.
  firstIndex =
    pred: default: list:
    let
      found = foldl' (
        found: i:
        if found != null then
          found
        else if pred (elemAt list i) then
          i
        else
          null
      ) null (genList (i: i) (length list));
    in
    if found == null then default else found;

  # A missing and a null attribute mean the same: "not set". SPEC.md writes optional
  # values as explicit null, so users may too.
  isSet = set: name: set ? ${name} && set.${name} != null;
  get = set: name: default: if isSet set name then set.${name} else default;

  # Names in messages are quoted the way release.rs prints them ({:?}).
  quote = toJSON;

  # What a value is, for "… must be X, not Y".
  describe =
    v:
    if isString v then
      "the string ${quote v}"
    else if isInt v || isFloat v then
      "the number ${toJSON v}"
    else if isBool v then
      (if v then "true" else "false")
    else if v == null then
      "null"
    else if isList v then
      "a list"
    else if isAttrs v then
      "an attribute set"
    else if isFunction v then
      "a function"
    else if isPath v then
      "the path ${toString v}"
    else
      "a ${typeOf v}";

  # ---------------------------------------------------------------- defaults
  # The reference mkFleet's default for every optional attribute it defines, so that a
  # fleet written for it evaluates unchanged and resolves the same
  # (docs/declare-your-fleet.md has the table). A missing and a null attribute both take
  # the default. `healthGate` defaults to { }, whose two fields default as below.

  defaults = {
    fleet = {
      hosts = { };
      tags = { };
      channels = { };
      rolloutPolicies = { };
      edges = [ ];
      channelEdges = [ ];
      disruptionBudgets = [ ];
      # The frameworks the reference knows. Accepted for compatibility; nixfleet does not
      # check a channel's frameworks against it.
      complianceFrameworks = [
        "anssi-bp028"
        "nis2"
        "dora"
        "iso27001"
      ];
      revocations = [ ];
    };
    host = {
      tags = [ ];
      pubkey = null;
    };
    tag = {
      description = "";
    };
    channel = {
      description = "";
      reconcileIntervalMinutes = 30;
      signingIntervalMinutes = 60;
      compliance = { };
    };
    compliance = {
      frameworks = [ ];
      mode = "enforce";
    };
    policy = {
      waves = [ ];
      healthGate = { };
      onHealthFailure = "rollback-and-halt";
    };
    wave = {
      soakMinutes = 0;
    };
    healthGate = {
      systemdFailedUnits = null;
      maxFailures = 0;
    };
    edge = {
      reason = "";
    };
    budget = {
      maxInFlight = null;
      maxInFlightPct = null;
    };
    revocation = {
      reason = null;
      revokedBy = null;
    };
  };

  # `set` with every attribute of `d` that it leaves out or sets to null taken from `d`.
  fill = d: set: set // mapAttrs (name: default: get set name default) d;

  # ---------------------------------------------------------------- shapes
  # A kind is a test plus the words for an error. u32 because release reads these numbers
  # as u32: anything else would evaluate here and be refused there.

  kinds = {
    string = {
      test = isString;
      what = "a string";
    };
    u32 = {
      test = v: isInt v && v >= 0 && v <= 4294967295;
      what = "a whole number from 0 to 4294967295";
    };
    bool = {
      test = isBool;
      what = "true or false";
    };
    attrs = {
      test = isAttrs;
      what = "an attribute set";
    };
    list = {
      test = isList;
      what = "a list";
    };
    strings = {
      test = v: isList v && all isString v;
      what = "a list of strings";
      explain =
        v: if isList v then "a list containing ${describe (head (filter (x: !isString x) v))}" else describe v;
    };
    onHealthFailure = {
      test = v: elem v [ "halt" "rollback-and-halt" ];
      what = ''"halt" or "rollback-and-halt"'';
    };
    # `lib.compliance` or what its `extend` returns: the functions the release gate calls.
    complianceLibrary = {
      test = v: isAttrs v && all (f: isFunction (v.${f} or null)) [ "controlsFor" "evaluateHost" "probesFor" ];
      what = "a compliance library (lib.compliance, or lib.compliance.extend { … })";
    };
    # A NixOS configuration (module, attribute set or function): CI builds it, so it is
    # neither checked nor written to the fleet JSON.
    anything = {
      test = _: true;
      what = "anything";
    };
  };

  required = kind: {
    inherit kind;
    optional = false;
  };
  optional = kind: {
    inherit kind;
    optional = true;
  };

  # Errors of one attribute set against its fields: unknown attributes (almost always a
  # typo, e.g. `tag` for `tags`), missing required ones, and values of the wrong kind.
  checkFields =
    place: fields: value:
    if !isAttrs value then
      [ "${place}: must be an attribute set, not ${describe value}" ]
    else
      map (
        name:
        "${place}: unknown attribute ${quote name}; expected ${concatStringsSep ", " (attrNames fields)}"
      ) (filter (name: !(fields ? ${name})) (attrNames value))
      ++ concatMap (
        name:
        let
          field = fields.${name};
          v = value.${name};
        in
        if !isSet value name then
          (if field.optional then [ ] else [ "${place}: ${name} is missing; set it to ${field.kind.what}" ])
        else if field.kind.test v then
          [ ]
        else
          [ "${place}: ${name} must be ${field.kind.what}, not ${(field.kind.explain or describe) v}" ]
      ) (attrNames fields);

  # Runs `check` only when the attribute holds the right kind, so that a shape error
  # further up is reported once instead of crashing the evaluation.
  checkIf =
    kind: set: name: check:
    if isAttrs set && isSet set name && kind.test set.${name} then check set.${name} else [ ];

  fleetFields = {
    hosts = optional kinds.attrs;
    tags = optional kinds.attrs;
    channels = optional kinds.attrs;
    rolloutPolicies = optional kinds.attrs;
    edges = optional kinds.list;
    channelEdges = optional kinds.list;
    disruptionBudgets = optional kinds.list;
    complianceFrameworks = optional kinds.strings;
    revocations = optional kinds.list;
  };
  # `compliance` is checked on its own, so that the list of fleet attributes in the
  # errors above stays the reference's.
  checkFleet =
    place: value:
    if isAttrs value then
      checkFields place fleetFields (removeAttrs value [ "compliance" ])
      ++ (
        if !isSet value "compliance" || kinds.complianceLibrary.test value.compliance then
          [ ]
        else
          [ "${place}: compliance must be ${kinds.complianceLibrary.what}, not ${describe value.compliance}" ]
      )
    else
      checkFields place fleetFields value;
  hostFields = {
    configuration = optional kinds.anything;
    system = required kinds.string;
    tags = optional kinds.strings;
    channel = required kinds.string;
    pubkey = optional kinds.string;
  };
  # Descriptions of tags, for people: nothing reads them.
  tagFields = {
    description = optional kinds.string;
  };
  channelFields = {
    description = optional kinds.string;
    rolloutPolicy = required kinds.string;
    reconcileIntervalMinutes = optional kinds.u32;
    signingIntervalMinutes = optional kinds.u32;
    freshnessWindow = required kinds.u32;
    compliance = optional kinds.attrs;
  };
  complianceFields = {
    frameworks = optional kinds.strings;
    mode = optional kinds.string;
  };
  policyFields = {
    strategy = required kinds.string;
    waves = optional kinds.list;
    healthGate = optional kinds.attrs;
    onHealthFailure = optional kinds.onHealthFailure;
  };
  waveFields = {
    selector = required kinds.attrs;
    soakMinutes = optional kinds.u32;
  };
  healthGateFields = {
    systemdFailedUnits = optional kinds.attrs;
    maxFailures = optional kinds.u32;
  };
  failedUnitsFields = {
    max = required kinds.u32;
  };
  edgeFields = {
    before = required kinds.string;
    after = required kinds.string;
    reason = optional kinds.string;
  };
  budgetFields = {
    selector = required kinds.attrs;
    maxInFlight = optional kinds.u32;
    maxInFlightPct = optional kinds.u32;
  };
  # What `nixfleet revocations sign` takes, one entry of its `revocations` list.
  revocationFields = {
    hostname = required kinds.string;
    notBefore = required kinds.string;
    reason = optional kinds.string;
    revokedBy = optional kinds.string;
  };

  # ---------------------------------------------------------------- selectors
  # Every key present must hold: tags (all of), tagsAny (any of), hosts, channel,
  # all (true: every host, false: none), not, and. As nixfleet-proto's Selector::matches.

  selectorFields = {
    tags = kinds.strings;
    tagsAny = kinds.strings;
    hosts = kinds.strings;
    channel = kinds.string;
    all = kinds.bool;
    not = kinds.attrs;
    and = kinds.list;
  };
  selectorKeys = "use tags, tagsAny, hosts, channel, all, not or and";

  # `path` locates a nested selector (".not", ".and[1]") so the message points at it.
  # Unlike release, which must ignore unknown keys for forward compatibility, an unknown
  # key is refused here: in a Nix file it is a typo.
  checkSelector =
    place: path: sel:
    let
      at = "${place}: selector${path}";
      names = attrNames sel;
      unknown = filter (k: !(selectorFields ? ${k})) names;
      present = filter (k: selectorFields ? ${k} && sel.${k} != null) names;
    in
    if !isAttrs sel then
      [ "${at} must be an attribute set, not ${describe sel}" ]
    else if unknown != [ ] then
      map (k: "${at} has unknown key ${quote k}; ${selectorKeys}") unknown
    else if present == [ ] then
      [ "${at} has no condition; ${selectorKeys}" ]
    else
      concatMap (
        k:
        let
          kind = selectorFields.${k};
        in
        if kind.test sel.${k} then
          [ ]
        else
          [ "${at}.${k} must be ${kind.what}, not ${(kind.explain or describe) sel.${k}}" ]
      ) present
      ++ checkIf kinds.attrs sel "not" (checkSelector place "${path}.not")
      ++ checkIf kinds.list sel "and" (
        subs: concatLists (imap0 (i: checkSelector place "${path}.and[${toString i}]") subs)
      );

  # Only the conditions that are set: release writes a selector without its absent keys.
  normalizeSelector =
    sel:
    mapAttrs (
      k: v:
      if k == "not" then
        normalizeSelector v
      else if k == "and" then
        map normalizeSelector v
      else
        v
    ) (filterAttrs (_: v: v != null) sel);

  # On a normalized selector and a resolved host. An empty selector matches nothing.
  matches =
    sel: name: host:
    sel != { }
    && (sel ? tags -> all (t: elem t host.tags) sel.tags)
    && (sel ? tagsAny -> any (t: elem t host.tags) sel.tagsAny)
    && (sel ? hosts -> elem name sel.hosts)
    && (sel ? channel -> sel.channel == host.channel)
    && (sel ? all -> sel.all)
    && (sel ? not -> !(matches sel.not name host))
    && (sel ? and -> all (s: matches s name host) sel.and);

  # ---------------------------------------------------------------- graphs

  # A cycle in the directed graph of `edges` ({ before; after; }), written
  # "a -> b -> a", or null. Deterministic: the smallest node on a cycle starts it, and the
  # cycle is a shortest one through that node.
  findCycle =
    edges:
    let
      byBefore = groupBy (e: e.before) edges;
      byAfter = groupBy (e: e.after) edges;
      successors = node: sort lessThan (map (e: e.after) (byBefore.${node} or [ ]));
      # Only a node with both outgoing and incoming edges can lie on a cycle.
      candidates = filter (n: byAfter ? ${n}) (attrNames byBefore);
      # genericClosure walks breadth first and keeps the first visit of each key, so each
      # item's `path` is a shortest path from the start.
      reachable =
        start: withPath:
        genericClosure {
          startSet = map (s: {
            key = s;
            path = if withPath then [ start s ] else null;
          }) (successors start);
          operator =
            item:
            map (s: {
              key = s;
              path = if withPath then item.path ++ [ s ] else null;
            }) (successors item.key);
        };
      onCycle = n: any (item: item.key == n) (reachable n false);
      start = firstIndex onCycle null candidates;
      node = elemAt candidates start;
      back = head (filter (item: item.key == node) (reachable node true));
    in
    if start == null then null else concatStringsSep " -> " back.path;

  # ---------------------------------------------------------------- errors

  throwIfAny =
    header: errors: value:
    if errors == [ ] then
      value
    else
      throw "${header}:\n${concatStringsSep "\n" (map (e: "  - ${e}") errors)}";

  defaultCompliance = import ./compliance;

  # ---------------------------------------------------------------- mkFleet

  mkFleet =
    fleet:
    let
      # ---- shape: every attribute where it belongs and of the right kind
      section = name: get (if isAttrs fleet then fleet else { }) name defaults.fleet.${name};
      inputHosts = section "hosts";
      inputTags = section "tags";
      inputChannels = section "channels";
      inputPolicies = section "rolloutPolicies";
      inputEdges = section "edges";
      inputChannelEdges = section "channelEdges";
      inputBudgets = section "disruptionBudgets";
      inputRevocations = section "revocations";

      topErrors = checkFleet "fleet" fleet;
      shapeErrors =
        if topErrors != [ ] then
          topErrors
        else
          concatMap (name: checkFields "host ${name}" hostFields inputHosts.${name}) (attrNames inputHosts)
          ++ concatMap (name: checkFields "tag ${name}" tagFields inputTags.${name}) (attrNames inputTags)
          ++ concatMap (
            name:
            let
              place = "channel ${name}";
              channel = inputChannels.${name};
            in
            checkFields place channelFields channel
            ++ checkIf kinds.attrs channel "compliance" (checkFields "${place} compliance" complianceFields)
          ) (attrNames inputChannels)
          ++ concatMap (
            name:
            let
              place = "rollout policy ${name}";
              policy = inputPolicies.${name};
            in
            checkFields place policyFields policy
            ++ checkIf kinds.list policy "waves" (
              waves:
              concatLists (
                imap0 (
                  i: wave:
                  let
                    wavePlace = "${place} wave ${toString i}";
                  in
                  checkFields wavePlace waveFields wave
                  ++ checkIf kinds.attrs wave "selector" (checkSelector wavePlace "")
                ) waves
              )
            )
            ++ checkIf kinds.attrs policy "healthGate" (
              gate:
              checkFields "${place} healthGate" healthGateFields gate
              ++ checkIf kinds.attrs gate "systemdFailedUnits" (
                checkFields "${place} healthGate.systemdFailedUnits" failedUnitsFields
              )
            )
          ) (attrNames inputPolicies)
          ++ concatLists (imap0 (i: checkFields "edge ${toString i}" edgeFields) inputEdges)
          ++ concatLists (imap0 (i: checkFields "channel edge ${toString i}" edgeFields) inputChannelEdges)
          ++ concatLists (
            imap0 (
              i: budget:
              let
                place = "disruption budget ${toString i}";
              in
              checkFields place budgetFields budget ++ checkIf kinds.attrs budget "selector" (checkSelector place "")
            ) inputBudgets
          )
          ++ concatLists (imap0 (i: checkFields "revocation ${toString i}" revocationFields) inputRevocations);

      # ---- normalized: defaults filled in, optional values explicit null, as release
      # reads and writes them. Only evaluated once the shape is right.
      hosts = mapAttrs (
        _: input:
        let
          h = fill defaults.host input;
        in
        {
          inherit (h) system channel tags;
          closureHash = null; # filled in by `nixfleet release --closures`
          inherit (h) pubkey;
        }
      ) inputHosts;

      # A channel's description is for people and, as in the reference, not resolved.
      channels = mapAttrs (
        _: input:
        let
          c = fill defaults.channel input;
          compliance = fill defaults.compliance c.compliance;
        in
        {
          inherit (c)
            rolloutPolicy
            reconcileIntervalMinutes
            signingIntervalMinutes
            freshnessWindow
            ;
          compliance = {
            inherit (compliance) frameworks mode;
          };
        }
      ) inputChannels;

      rolloutPolicies = mapAttrs (
        _: input:
        let
          p = fill defaults.policy input;
          gate = fill defaults.healthGate p.healthGate;
        in
        {
          inherit (p) strategy onHealthFailure;
          waves = map (
            input:
            let
              w = fill defaults.wave input;
            in
            {
              selector = normalizeSelector w.selector;
              inherit (w) soakMinutes;
            }
          ) p.waves;
          healthGate = {
            systemdFailedUnits =
              if gate.systemdFailedUnits == null then null else { inherit (gate.systemdFailedUnits) max; };
            inherit (gate) maxFailures;
          };
        }
      ) inputPolicies;

      normalizeEdge =
        input:
        let
          e = fill defaults.edge input;
        in
        {
          inherit (e) before after reason;
        };
      edges = map normalizeEdge inputEdges;
      channelEdges = map normalizeEdge inputChannelEdges;

      disruptionBudgets = map (
        input:
        let
          b = fill defaults.budget input;
        in
        {
          selector = normalizeSelector b.selector;
          inherit (b) maxInFlight maxInFlightPct;
        }
      ) inputBudgets;

      # The reference's `revocations`: the list `nixfleet revocations sign` signs.
      revocations = map (
        input:
        let
          r = fill defaults.revocation input;
        in
        {
          inherit (r)
            hostname
            notBefore
            reason
            revokedBy
            ;
        }
      ) inputRevocations;

      hostNames = attrNames hosts;
      channelHosts = channel: filter (n: hosts.${n}.channel == channel) hostNames;
      select = sel: filter (n: matches sel n hosts.${n}) hostNames;

      # ---- meaning: the checks of release.rs, in its order
      validHostname = name: match "[A-Za-z0-9_-][A-Za-z0-9_.-]{0,252}" name != null;

      hostErrors = concatMap (
        name:
        let
          channel = hosts.${name}.channel;
        in
        (
          if validHostname name then
            [ ]
          else
            [ "host name ${quote name} is not valid; use letters, digits, '-', '_' and '.', not first (at most 253)" ]
        )
        ++ (if channels ? ${channel} then [ ] else [ "host ${name}: unknown channel ${quote channel}" ])
      ) hostNames;

      # Channel names become file names and URL path segments.
      validChannelName = name: match "[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}" name != null;

      channelErrors = concatMap (
        name:
        let
          c = channels.${name};
        in
        (
          if validChannelName name then
            [ ]
          else
            [ "channel name ${quote name} is not valid; use letters, digits, '-', '_' and '.', not first (at most 64)" ]
        )
        ++ (
          if rolloutPolicies ? ${c.rolloutPolicy} then
            [ ]
          else
            [ "channel ${name}: unknown rollout policy ${quote c.rolloutPolicy}" ]
        )
        ++ (
          if c.freshnessWindow >= 2 * c.signingIntervalMinutes then
            [ ]
          else
            [
              "channel ${name}: freshnessWindow ${toString c.freshnessWindow} is less than 2 × signingIntervalMinutes (${toString c.signingIntervalMinutes}); a release would go stale before the next one is signed"
            ]
        )
      ) (attrNames channels);

      budgetErrors = concatLists (
        imap0 (
          i: b:
          let
            place = "disruption budget ${toString i}";
          in
          if b.maxInFlight == null && b.maxInFlightPct == null then
            [ "${place}: set maxInFlight, maxInFlightPct or both" ]
          else if b.maxInFlight == 0 then
            [ "${place}: maxInFlight 0 would never let a host through" ]
          else if b.maxInFlightPct != null && (b.maxInFlightPct == 0 || b.maxInFlightPct > 100) then
            [ "${place}: maxInFlightPct ${toString b.maxInFlightPct} is not between 1 and 100" ]
          else
            [ ]
        ) disruptionBudgets
      );

      edgeErrors = concatMap (
        e:
        map (host: "edge ${e.before} -> ${e.after}: unknown host ${quote host}") (
          filter (host: !(hosts ? ${host})) [
            e.before
            e.after
          ]
        )
      ) edges;
      edgeCycle = findCycle edges;

      channelEdgeErrors = concatMap (
        e:
        map (channel: "channel edge ${e.before} -> ${e.after}: unknown channel ${quote channel}") (
          filter (channel: !(channels ? ${channel})) [
            e.before
            e.after
          ]
        )
      ) channelEdges;
      channelEdgeCycle = findCycle channelEdges;

      meaningErrors =
        hostErrors
        ++ channelErrors
        ++ budgetErrors
        ++ edgeErrors
        ++ (if edgeCycle == null then [ ] else [ "edges form a cycle: ${edgeCycle}" ])
        ++ channelEdgeErrors
        ++ (if channelEdgeCycle == null then [ ] else [ "channel edges form a cycle: ${channelEdgeCycle}" ]);

      errors = if shapeErrors != [ ] then shapeErrors else meaningErrors;
      checked = throwIfAny "mkFleet: fleet is invalid" errors;

      # ---- waves, per channel: a host joins the first wave whose selector matches it,
      # else the last wave. Every policy wave is kept, possibly empty, so wave indices
      # match the policy's.
      waves = mapAttrs (
        name: channel:
        let
          policy = rolloutPolicies.${channel.rolloutPolicy};
          last = length policy.waves - 1;
          placed = map (host: {
            inherit host;
            wave = firstIndex (w: matches w.selector host hosts.${host}) last policy.waves;
          }) (channelHosts name);
        in
        imap0 (i: w: {
          hosts = map (p: p.host) (filter (p: p.wave == i) placed);
          inherit (w) soakMinutes;
        }) policy.waves
      ) channels;

      # The warnings release prints: not errors, but worth a look in CI.
      selectorPlaces =
        concatMap (
          name:
          imap0 (i: w: {
            place = "rollout policy ${name} wave ${toString i}";
            inherit (w) selector;
          }) rolloutPolicies.${name}.waves
        ) (attrNames rolloutPolicies)
        ++ imap0 (i: b: {
          place = "disruption budget ${toString i}";
          inherit (b) selector;
        }) disruptionBudgets;
      # A policy without waves (the reference's default) places no host, as in the
      # reference; release refuses it.
      warnings =
        concatMap (
          name:
          if rolloutPolicies.${name}.waves == [ ] then
            [
              "rollout policy ${name}: has no waves, so no host of a channel that uses it is ever dispatched; nixfleet release refuses it"
            ]
          else
            [ ]
        ) (attrNames rolloutPolicies)
        ++ map (s: "${s.place}: selector matches no host") (filter (s: select s.selector == [ ]) selectorPlaces)
        ++ concatMap (
          name:
          if channelHosts name == [ ] then
            [ ]
          else
            concatLists (
              imap0 (
                i: wave:
                if wave.hosts == [ ] then
                  [ "channel ${name}: wave ${toString i} of policy ${channels.${name}.rolloutPolicy} has no host" ]
                else
                  [ ]
              ) waves.${name}
            )
        ) (attrNames channels);
    in
    {
      # The unsigned fleet.resolved, JSON-clean: `nixfleet release --fleet` takes it as is.
      resolved = checked {
        schemaVersion = 1;
        inherit
          hosts
          channels
          rolloutPolicies
          waves
          edges
          channelEdges
          disruptionBudgets
          ;
        meta = {
          schemaVersion = 1;
          signedAt = null;
          ciCommit = null;
          signatureAlgorithm = null;
        };
      };

      # name -> NixOS configuration, for CI to build each host's closure. Hosts without a
      # configuration are left out.
      hostConfigurations = checked (
        mapAttrs (_: h: h.configuration) (filterAttrs (_: h: isSet h "configuration") inputHosts)
      );

      # The reference's revocations: hostname, notBefore, reason and revokedBy each.
      revocations = checked revocations;

      warnings = checked warnings;

      # The controls `nixfleet release --flake` checks each host against (its static
      # gate): nixfleet's own library unless the fleet passes `compliance`.
      compliance = get (if isAttrs fleet then fleet else { }) "compliance" defaultCompliance;
    };

  # ---------------------------------------------------------------- mergeFleets

  # Several fleet descriptions (say one per team) into one. Lists are concatenated (the
  # compliance frameworks without repeats); a host, tag, channel or rollout policy defined
  # by more than one fleet is an error, never a silent override.
  mergeFleets =
    fleets:
    let
      shapeErrors =
        if !isList fleets then
          [ "mergeFleets takes a list of fleets, not ${describe fleets}" ]
        else
          concatLists (imap0 (i: checkFleet "merged fleet ${toString i}") fleets);

      section = name: map (f: get f name defaults.fleet.${name}) fleets;

      # name -> indices of the fleets that define it
      owners = name: zipAttrsWith (_: indices: indices) (imap0 (i: mapAttrs (_: _: i)) (section name));
      duplicates =
        sectionName: what:
        let
          byName = owners sectionName;
        in
        concatMap (
          name:
          let
            indices = byName.${name};
          in
          if length indices > 1 then
            [
              "${what} ${name}: defined in more than one merged fleet (fleets ${concatStringsSep ", " (map toString indices)})"
            ]
          else
            [ ]
        ) (attrNames byName);

      errors =
        if shapeErrors != [ ] then
          shapeErrors
        else
          duplicates "hosts" "host"
          ++ duplicates "tags" "tag"
          ++ duplicates "channels" "channel"
          ++ duplicates "rolloutPolicies" "rollout policy"
          # Libraries hold functions, which cannot be compared: only one fleet may set it.
          ++ (
            if length withCompliance > 1 then
              [
                "compliance: set by more than one merged fleet (fleets ${concatStringsSep ", " (map toString withCompliance)}); set it once, with every fleet's controls in one extend"
              ]
            else
              [ ]
          );

      withCompliance = filter (i: isSet (elemAt fleets i) "compliance") (genList (i: i) (length fleets));
      union = name: foldl' (a: b: a // b) { } (section name);
      concat = name: concatLists (section name);
      # Only from the fleets that set them: the others must not bring in the default list.
      withFrameworks = filter (f: isSet f "complianceFrameworks") fleets;
      frameworks = foldl' (seen: f: if elem f seen then seen else seen ++ [ f ]) [ ] (
        concatMap (f: f.complianceFrameworks) withFrameworks
      );
    in
    throwIfAny "mergeFleets: fleets cannot be merged" errors (
      {
        hosts = union "hosts";
        tags = union "tags";
        channels = union "channels";
        rolloutPolicies = union "rolloutPolicies";
        edges = concat "edges";
        channelEdges = concat "channelEdges";
        disruptionBudgets = concat "disruptionBudgets";
        revocations = concat "revocations";
      }
      // (if withFrameworks == [ ] then { } else { complianceFrameworks = frameworks; })
      // (if withCompliance == [ ] then { } else { compliance = (elemAt fleets (head withCompliance)).compliance; })
    );
in
{
  inherit mkFleet mergeFleets;
}
