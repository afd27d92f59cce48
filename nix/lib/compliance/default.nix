# Compliance controls as data (docs/compliance.md). Builtins only: no nixpkgs.
#
#   frameworks              name -> { title; reference; }: cis, nis2, iso27001, anssi, dora
#   controls                the starter controls, a list ordered by id
#   controlsFor fws         the controls listing articles for any framework in fws, by id,
#                           each once ("anssi-bp028" is accepted for "anssi")
#   evaluateHost { controls; config; }
#                           -> [ { id; title; articles; passed; evidence; } ]
#   probesFor controls      -> [ { id; articles; command; timeoutSecs; expect; } ], plain
#                           JSON: what the agent runs after activation
#   describe controls       the controls without their functions, as JSON
#   checkControl control    the control, or an error naming everything wrong with it
#   extend { extraControls ? [ ]; allowedLoginUsers ? [ "root" ]; }
#                           this library over the starter controls with these settings
#                           plus the fleet's own controls (an id may not repeat)
let
  inherit (builtins)
    all
    any
    attrNames
    concatMap
    concatStringsSep
    elem
    filter
    foldl'
    head
    isAttrs
    isBool
    isFunction
    isInt
    isList
    isString
    match
    sort
    toJSON
    typeOf
    ;

  frameworks = {
    cis = {
      title = "CIS Distribution Independent Linux Benchmark";
      reference = "v2.0.0 section numbers";
    };
    nis2 = {
      title = "NIS2 Directive (EU) 2022/2555";
      reference = "Article 21(2) points, written 21.2.<point>";
    };
    iso27001 = {
      title = "ISO/IEC 27001:2022";
      reference = "Annex A controls";
    };
    anssi = {
      title = "ANSSI-BP-028 Configuration recommendations of a GNU/Linux system";
      reference = "v2.0 recommendation numbers";
    };
    dora = {
      title = "DORA Regulation (EU) 2022/2554";
      reference = "articles, written <article>.<paragraph>.<point>";
    };
  };
  frameworkNames = attrNames frameworks;
  # Names other parts of nixfleet use for the same framework: mkFleet's reference
  # complianceFrameworks list calls ANSSI-BP-028 "anssi-bp028".
  aliases = {
    "anssi-bp028" = "anssi";
  };
  canonical = name: aliases.${name} or name;

  probeExpectations = [ "exit0" ];
  maxTimeoutSecs = 300;

  problemsOf =
    control:
    let
      at = "control ${if isAttrs control && isString (control.id or null) then control.id else "<no id>"}";
      has = name: isAttrs control && control ? ${name};
      probe = control.probe or null;
      articleProblems =
        if !(has "articles") || !isAttrs control.articles then
          [ "${at}: articles must be an attribute set of framework -> [ article … ]" ]
        else if control.articles == { } then
          [ "${at}: articles is empty, so the control belongs to no framework" ]
        else
          concatMap (
            fw:
            let
              list = control.articles.${fw};
            in
            (if elem fw frameworkNames then [ ] else [ "${at}: unknown framework \"${fw}\" (known: ${concatStringsSep ", " frameworkNames})" ])
            ++ (
              if isList list && list != [ ] && all isString list then
                [ ]
              else
                [ "${at}: articles.${fw} must be a non-empty list of strings" ]
            )
          ) (attrNames control.articles);
      probeProblems =
        if probe == null then
          (
            if isString (control.noProbeReason or null) && control.noProbeReason != "" then
              [ ]
            else
              [ "${at}: probe is null, so noProbeReason must say why" ]
          )
        else if !isAttrs probe then
          [ "${at}: probe must be null or { command; timeoutSecs; expect; }" ]
        else
          (
            let
              cmd = probe.command or null;
            in
            if isList cmd && cmd != [ ] && all isString cmd && match "/.*" (head cmd) != null then
              [ ]
            else
              [ "${at}: probe.command must be a non-empty list of strings starting with an absolute path" ]
          )
          ++ (
            let
              t = probe.timeoutSecs or null;
            in
            if isInt t && t > 0 && t <= maxTimeoutSecs then
              [ ]
            else
              [ "${at}: probe.timeoutSecs must be an integer from 1 to ${toString maxTimeoutSecs}" ]
          )
          ++ (
            if elem (probe.expect or null) probeExpectations then
              [ ]
            else
              [ "${at}: probe.expect must be one of ${toJSON probeExpectations}" ]
          )
          ++ (
            let
              unknown = filter (n: !(elem n [ "command" "timeoutSecs" "expect" ])) (attrNames probe);
            in
            if unknown == [ ] then [ ] else [ "${at}: probe has unknown attributes ${toJSON unknown}" ]
          );
      known = [
        "id"
        "title"
        "description"
        "articles"
        "evaluate"
        "probe"
        "noProbeReason"
      ];
    in
    if !isAttrs control then
      [ "a control must be an attribute set, not a ${typeOf control}" ]
    else
      (
        if isString (control.id or null) && match "[a-z0-9][a-z0-9-]*" control.id != null then
          [ ]
        else
          [ "${at}: id must be a string of lower-case letters, digits and dashes" ]
      )
      ++ (if isString (control.title or null) && control.title != "" then [ ] else [ "${at}: title must be a non-empty string" ])
      ++ (if isString (control.description or "") then [ ] else [ "${at}: description must be a string" ])
      ++ articleProblems
      ++ (if isFunction (control.evaluate or null) then [ ] else [ "${at}: evaluate must be a function of the host's config" ])
      ++ (if has "probe" then probeProblems else [ "${at}: probe must be set (null when the control has no runtime check)" ])
      ++ (
        let
          unknown = filter (n: !(elem n known)) (attrNames control);
        in
        if unknown == [ ] then [ ] else [ "${at}: unknown attributes ${toJSON unknown}" ]
      );

  checkControls =
    controls:
    let
      problems =
        (if isList controls then concatMap problemsOf controls else [ "controls must be a list" ])
        ++ (
          let
            ids = map (c: c.id or null) (if isList controls then controls else [ ]);
            dups = foldl' (
              acc: id:
              if !(elem id acc.seen) then
                acc // { seen = acc.seen ++ [ id ]; }
              else if elem id acc.dups then
                acc
              else
                acc // { dups = acc.dups ++ [ id ]; }
            ) {
              seen = [ ];
              dups = [ ];
            } ids;
          in
          map (id: "control id ${toJSON id} is defined more than once") dups.dups
        );
    in
    if problems == [ ] then
      controls
    else
      throw "compliance: invalid controls:\n  - ${concatStringsSep "\n  - " problems}";

  checkControl = control: head (checkControls [ control ]);

  byId = sort (a: b: a.id < b.id);

  checkFrameworks =
    fws:
    let
      names = if isList fws && all isString fws then map canonical fws else throw "compliance: controlsFor takes a list of framework names, got ${typeOf fws}";
      unknown = filter (n: !(elem n frameworkNames)) names;
    in
    if unknown == [ ] then
      names
    else
      throw "compliance: unknown framework ${concatStringsSep ", " (map toJSON unknown)} (known: ${concatStringsSep ", " frameworkNames}; \"anssi-bp028\" means anssi)";

  evaluateOne =
    config: control:
    let
      r = control.evaluate config;
    in
    if isAttrs r && isBool (r.passed or null) && isString (r.evidence or null) then
      {
        inherit (control) id title articles;
        inherit (r) passed evidence;
      }
    else
      throw "compliance: control ${control.id}: evaluate must return { passed = <bool>; evidence = <string>; }, not ${if isAttrs r then toJSON (attrNames r) else typeOf r}";

  # The library over the starter controls (with `settings.allowedLoginUsers`) and
  # `settings.extraControls`.
  make =
    settings:
    let
      catalogue = byId (
        checkControls (
          import ./controls.nix { inherit (settings) allowedLoginUsers; } ++ settings.extraControls
        )
      );
    in
    {
      inherit frameworks aliases checkControl;
      inherit (settings) allowedLoginUsers;
      controls = catalogue;

      controlsFor =
        fws:
        let
          names = checkFrameworks fws;
        in
        filter (c: any (fw: c.articles ? ${fw}) names) catalogue;

      evaluateHost =
        {
          controls,
          config,
        }:
        map (evaluateOne config) (checkControls controls);

      probesFor =
        controls:
        map (c: {
          inherit (c) id articles;
          inherit (c.probe) command timeoutSecs expect;
        }) (filter (c: c.probe != null) (checkControls controls));

      describe =
        controls:
        map (
          c:
          {
            inherit (c) id title articles probe;
            description = c.description or "";
          }
          // (if c.probe == null then { inherit (c) noProbeReason; } else { })
        ) (checkControls controls);

      # Controls added by an earlier extend are kept; allowedLoginUsers is replaced.
      extend =
        {
          extraControls ? [ ],
          allowedLoginUsers ? settings.allowedLoginUsers,
        }:
        make {
          allowedLoginUsers =
            if
              isList allowedLoginUsers
              && all (n: isString n && match "[a-z_][a-z0-9_-]*[$]?" n != null) allowedLoginUsers
            then
              allowedLoginUsers
            else
              throw "compliance: allowedLoginUsers must be a list of user names";
          extraControls =
            settings.extraControls
            ++ (if isList extraControls then extraControls else throw "compliance: extraControls must be a list");
        };
    };
in
make {
  allowedLoginUsers = [ "root" ];
  extraControls = [ ];
}
