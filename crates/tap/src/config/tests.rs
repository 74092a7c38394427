use super::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Config, CliError> {
    let mut argv = vec!["tap", "run"];
    argv.extend_from_slice(args);
    match parse(argv, &Environment::from_pairs(env.iter().copied()))? {
        Invocation::Run(cfg) => Ok(*cfg),
        other => panic!("expected run, got {other:?}"),
    }
}

#[test]
fn status_and_repos_share_how_to_reach_tap_and_parse_their_own_options() {
    let env = Environment::from_pairs([("TAP_ADMIN_PASSWORD", "pw")]);
    let Invocation::Status(status) = parse(["tap", "status"], &env).unwrap() else {
        panic!("expected status")
    };
    assert_eq!(status.remote.admin_password.as_deref(), Some("pw"));
    assert_eq!((status.json, status.watch), (false, None));
    let args = ["tap", "status", "--json", "--watch", "--interval=500ms"];
    let Invocation::Status(status) = parse(args, &env).unwrap() else {
        panic!("expected status")
    };
    assert_eq!(
        (status.json, status.watch),
        (true, Some(Duration::from_millis(500)))
    );
    assert!(matches!(
        parse(["tap", "status", "--interval=0s"], &env),
        Err(CliError::Invalid(_))
    ));

    let repos = |args: &[&str]| match parse(args.iter().copied(), &env).unwrap() {
        Invocation::Repos(r) => r,
        other => panic!("expected repos, got {other:?}"),
    };
    let r = repos(&[
        "tap",
        "repos",
        "add",
        "did:plc:a",
        "did:plc:b",
        "--url=http://h:1",
    ]);
    assert_eq!(r.remote.url.as_str(), "http://h:1/");
    assert_eq!(
        r.command,
        ReposCommand::Add(vec!["did:plc:a".into(), "did:plc:b".into()])
    );
    assert_eq!(
        repos(&["tap", "repos", "resync"]).command,
        ReposCommand::Resync(vec![])
    );
    assert_eq!(
        repos(&["tap", "repos", "--url=http://h:2", "info", "did:plc:a"]).command,
        ReposCommand::Info("did:plc:a".into())
    );
    assert_eq!(
        repos(&["tap", "repos", "list", "--state=error", "--limit=5"]).command,
        ReposCommand::List {
            state: Some("error".into()),
            limit: Some(5)
        }
    );
    for bad in [
        &["tap", "repos"][..],
        &["tap", "repos", "info"],
        &["tap", "repos", "list", "--limit=some"],
    ] {
        assert!(
            matches!(parse(bad.iter().copied(), &env), Err(CliError::Clap(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn healthcheck_takes_its_url_password_and_timeout_from_flags_or_the_environment() {
    let env = Environment::from_pairs([("TAP_ADMIN_PASSWORD", "from-env")]);
    let Invocation::Healthcheck(check) = parse(["tap", "healthcheck"], &env).unwrap() else {
        panic!("expected healthcheck")
    };
    assert_eq!(check.url.as_str(), "http://127.0.0.1:2480/");
    assert_eq!(check.admin_password.as_deref(), Some("from-env"));
    assert_eq!(check.timeout, Duration::from_secs(5));
    let args = [
        "tap",
        "healthcheck",
        "--url=http://10.0.0.7:9000",
        "--admin-password=flag",
        "--timeout=500ms",
    ];
    let Invocation::Healthcheck(check) = parse(args, &env).unwrap() else {
        panic!("expected healthcheck")
    };
    assert_eq!(check.url.as_str(), "http://10.0.0.7:9000/");
    assert_eq!(check.admin_password.as_deref(), Some("flag"));
    assert_eq!(check.timeout, Duration::from_millis(500));
    for bad in ["--url=not a url", "--timeout=soon"] {
        assert!(matches!(
            parse(["tap", "healthcheck", bad], &env),
            Err(CliError::Invalid(_))
        ));
    }
}

fn invalid_flag(args: &[&str], env: &[(&str, &str)]) -> ConfigError {
    match run(args, env) {
        Err(CliError::Invalid(e)) => e,
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn defaults_match_the_go_tap() {
    let cfg = run(&[], &[]).unwrap();
    assert_eq!(cfg.bind, ":2480");
    assert_eq!(cfg.database, DatabaseUrl::Sqlite("./tap.db".into()));
    assert_eq!(cfg.plc_url.as_str(), "https://plc.directory/");
    assert_eq!(
        cfg.relay_url.as_str(),
        "https://relay1.us-east.bsky.network/"
    );
    assert_eq!((cfg.firehose_parallelism, cfg.resync_parallelism), (10, 5));
    assert_eq!(cfg.cursor_save_interval, Duration::from_secs(1));
    assert_eq!(cfg.repo_fetch_timeout, Duration::from_secs(300));
    assert_eq!(cfg.ident_cache_size, 2_000_000);
    assert_eq!(cfg.outbox_capacity, 100_000);
    assert_eq!(cfg.retry_timeout, Duration::from_secs(60));
    assert_eq!(cfg.max_db_conns, 32);
    assert_eq!(cfg.delivery, DeliveryMode::WebSocketAck);
    assert_eq!(cfg.scope, TrackingScope::Dynamic);
    assert!(cfg.collection_filters.is_empty());
    assert!(!cfg.no_replay && !cfg.outbox_only);
    assert_eq!(cfg.admin_password, None);
    assert_eq!(cfg.metrics_listen, None);
    assert_eq!(cfg.log_level, LogLevel::Info);
    assert_eq!(cfg.env_name, "dev");
    // Config::defaults() is the same thing without a command line.
    assert_eq!(Config::defaults().bind, cfg.bind);
}

#[test]
fn go_style_boolean_flags_accept_bare_and_explicit_forms() {
    assert_eq!(
        run(&["--disable-acks"], &[]).unwrap().delivery,
        DeliveryMode::FireAndForget
    );
    assert_eq!(
        run(&["--disable-acks=true"], &[]).unwrap().delivery,
        DeliveryMode::FireAndForget
    );
    assert_eq!(
        run(&["--disable-acks=false"], &[]).unwrap().delivery,
        DeliveryMode::WebSocketAck
    );
    for v in ["1", "true", "TRUE", "t"] {
        assert_eq!(
            run(&[], &[("TAP_DISABLE_ACKS", v)]).unwrap().delivery,
            DeliveryMode::FireAndForget,
            "{v}"
        );
    }
    assert_eq!(
        run(&[], &[("TAP_DISABLE_ACKS", "0")]).unwrap().delivery,
        DeliveryMode::WebSocketAck
    );
    let e = invalid_flag(&[], &[("TAP_DISABLE_ACKS", "yes")]);
    assert_eq!((e.flag, e.env), ("disable-acks", "TAP_DISABLE_ACKS"));
}

#[test]
fn flag_beats_environment_which_beats_default() {
    let cfg = run(&["--bind=127.0.0.1:9"], &[("TAP_BIND", "127.0.0.1:8")]).unwrap();
    assert_eq!(cfg.bind, "127.0.0.1:9");
    let cfg = run(&[], &[("TAP_BIND", "127.0.0.1:8")]).unwrap();
    assert_eq!(cfg.bind, "127.0.0.1:8");
    let cfg = run(&["--retry-timeout", "1m30s"], &[]).unwrap();
    assert_eq!(cfg.retry_timeout, Duration::from_secs(90));
}

#[test]
fn aliases_are_read_when_the_documented_variable_is_unset() {
    let cfg = run(&[], &[("ATP_PLC_HOST", "http://127.0.0.1:2582")]).unwrap();
    assert_eq!(cfg.plc_url.as_str(), "http://127.0.0.1:2582/");
    let cfg = run(
        &[],
        &[
            ("TAP_PLC_URL", "http://a.example"),
            ("ATP_PLC_HOST", "http://b.example"),
        ],
    )
    .unwrap();
    assert_eq!(cfg.plc_url.host_str(), Some("a.example"));
    let cfg = run(&[], &[("LOG_LEVEL", "debug")]).unwrap();
    assert_eq!(cfg.log_level, LogLevel::Debug);
    let cfg = run(&[], &[("RELAY_IDENT_CACHE_SIZE", "7")]).unwrap();
    assert_eq!(cfg.ident_cache_size, 7);
    let cfg = run(&[], &[("TAP_IDENT_CACHE_SIZE", "8")]).unwrap();
    assert_eq!(cfg.ident_cache_size, 8);
}

#[test]
fn unknown_log_level_falls_back_to_info() {
    assert_eq!(
        run(&["--log-level=loud"], &[]).unwrap().log_level,
        LogLevel::Info
    );
}

#[test]
fn delivery_mode_precedence_is_webhook_then_disable_acks() {
    let cfg = run(
        &["--webhook-url=http://127.0.0.1:9/hook", "--disable-acks"],
        &[],
    )
    .unwrap();
    assert!(matches!(cfg.delivery, DeliveryMode::Webhook { .. }));
}

#[test]
fn nats_delivery_is_refused_beside_a_webhook_or_disable_acks_and_checks_its_names() {
    let cfg = run(&[], &[("TAP_NATS_URL", "nats://127.0.0.1:4222")]).unwrap();
    assert_eq!(
        cfg.delivery,
        DeliveryMode::Nats(crate::config::NatsTarget {
            url: "nats://127.0.0.1:4222".into(),
            stream: "tap".into(),
            subject_prefix: "tap".into(),
            max_age: std::time::Duration::from_secs(168 * 3600),
            duplicate_window: std::time::Duration::from_secs(600),
        })
    );
    for other in ["--webhook-url=http://127.0.0.1:9/hook", "--disable-acks"] {
        let err = run(&["--nats-url=nats://127.0.0.1:4222", other], &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains("replaces the webhook and /channel"),
            "{err}"
        );
    }
    let bad = [
        ("--nats-url=http://127.0.0.1:4222", "nats-url"),
        ("--nats-stream=a.b", "nats-stream"),
        ("--nats-subject-prefix=tap.>", "nats-subject-prefix"),
        ("--nats-subject-prefix=tap..x", "nats-subject-prefix"),
    ];
    for (flag, named) in bad {
        let err = run(&["--nats-url=nats://127.0.0.1:4222", flag], &[]).unwrap_err();
        assert!(err.to_string().contains(named), "{flag}: {err}");
    }
}

#[test]
fn collection_filters_split_on_commas_from_env_and_repeated_flags() {
    let cfg = run(
        &[],
        &[(
            "TAP_COLLECTION_FILTERS",
            "app.bsky.feed.post,app.bsky.graph.*",
        )],
    )
    .unwrap();
    let got: Vec<String> = cfg
        .collection_filters
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(got, ["app.bsky.feed.post", "app.bsky.graph.*"]);
    let cfg = run(
        &[
            "--collection-filters=app.bsky.feed.post",
            "--collection-filters",
            "app.bsky.graph.*,*",
        ],
        &[],
    )
    .unwrap();
    assert_eq!(cfg.collection_filters.len(), 3);
}

#[test]
fn wildcard_anywhere_but_a_whole_last_segment_is_rejected() {
    for bad in ["app.bsky.feed*", "app.*.post", "*.bsky", "app.bsky.f*ed"] {
        let e = invalid_flag(&[&format!("--collection-filters={bad}")], &[]);
        assert_eq!(e.flag, "collection-filters", "{bad}");
        assert!(e.to_string().contains(bad), "{e}");
    }
}

#[test]
fn relay_and_plc_urls_must_be_http() {
    let e = invalid_flag(&["--relay-url=wss://relay.example"], &[]);
    assert_eq!(e.flag, "relay-url");
    assert!(e.to_string().contains("http://"), "{e}");
    let e = invalid_flag(&[], &[("TAP_PLC_URL", "ftp://plc.example")]);
    assert_eq!(e.flag, "plc-url");
    let e = invalid_flag(&["--webhook-url=not a url"], &[]);
    assert_eq!(e.flag, "webhook-url");
}

#[test]
fn no_replay_with_full_network_is_rejected() {
    let e = invalid_flag(&["--no-replay", "--full-network"], &[]);
    assert_eq!(e.flag, "no-replay");
    assert!(e.to_string().contains("--full-network"), "{e}");
}

#[test]
fn unknown_database_scheme_is_rejected() {
    let e = invalid_flag(&["--db-url=mysql://localhost/tap"], &[]);
    assert_eq!(e.flag, "db-url");
    assert!(e.to_string().contains("mysql://localhost/tap"), "{e}");
    let cfg = run(&["--db-url=postgres://postgres@127.0.0.1/tap"], &[]).unwrap();
    assert!(matches!(cfg.database, DatabaseUrl::Postgres(_)));
    let cfg = run(&["--db-url=postgresql://postgres@127.0.0.1/tap"], &[]).unwrap();
    assert!(matches!(cfg.database, DatabaseUrl::Postgres(_)));
}

#[test]
fn unparseable_durations_and_counts_name_the_flag() {
    let e = invalid_flag(&["--retry-timeout=10"], &[]);
    assert_eq!(e.flag, "retry-timeout");
    let e = invalid_flag(&[], &[("TAP_CURSOR_SAVE_INTERVAL", "soon")]);
    assert_eq!(
        e.to_string(),
        "invalid --cursor-save-interval (TAP_CURSOR_SAVE_INTERVAL): \"soon\" is not a duration (examples: 1s, 300ms, 1m30s)"
    );
    let e = invalid_flag(&["--firehose-parallelism=0"], &[]);
    assert_eq!(e.flag, "firehose-parallelism");
    // Accepted and ignored, but still a count: a typo fails as it would in the Go tap.
    run(&["--outbox-parallelism=4"], &[]).unwrap();
    let e = invalid_flag(&["--outbox-parallelism=many"], &[]);
    assert_eq!(e.flag, "outbox-parallelism");
    let e = invalid_flag(&["--outbox-capacity=lots"], &[]);
    assert_eq!(e.flag, "outbox-capacity");
    let e = invalid_flag(&["--bind=2480"], &[]);
    assert_eq!(e.flag, "bind");
}

#[test]
fn signal_collections_accept_one_or_several_nsids() {
    let cfg = run(&["--signal-collection=app.bsky.actor.profile"], &[]).unwrap();
    assert!(matches!(cfg.scope, TrackingScope::SignalCollections(ref v) if v.len() == 1));
    let cfg = run(&[], &[("TAP_SIGNAL_COLLECTION", "com.a.b,com.c.d")]).unwrap();
    assert!(matches!(cfg.scope, TrackingScope::SignalCollections(ref v) if v.len() == 2));
    let e = invalid_flag(&["--signal-collection=not-an-nsid"], &[]);
    assert_eq!(e.flag, "signal-collection");
    // The plural spellings of indigo's runtime-filters work are aliases.
    let cfg = run(&["--signal-collections", "com.a.b,com.c.d"], &[]).unwrap();
    assert!(matches!(cfg.scope, TrackingScope::SignalCollections(ref v) if v.len() == 2));
    let cfg = run(&[], &[("TAP_SIGNAL_COLLECTIONS", "com.a.b")]).unwrap();
    assert!(matches!(cfg.scope, TrackingScope::SignalCollections(ref v) if v.len() == 1));
}

#[test]
fn dotenv_file_fills_only_unset_variables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".env");
    std::fs::write(&path, "TAP_BIND=127.0.0.1:7\nTAP_RETRY_TIMEOUT=5s\n").unwrap();
    let mut env = Environment::from_pairs([("TAP_BIND", "127.0.0.1:6")]);
    env.merge_dotenv(&path);
    let Invocation::Run(cfg) = parse(["tap", "run"], &env).unwrap() else {
        panic!("expected run")
    };
    assert_eq!(cfg.bind, "127.0.0.1:6");
    assert_eq!(cfg.retry_timeout, Duration::from_secs(5));
}

#[test]
fn bare_tap_prints_help_and_unknown_flags_are_usage_errors() {
    let Invocation::Help(help) = parse(["tap"], &Environment::default()).unwrap() else {
        panic!("expected help")
    };
    assert!(help.contains("run"), "{help}");
    assert!(matches!(
        parse(["tap", "run", "--no-such-flag"], &Environment::default()),
        Err(CliError::Clap(_))
    ));
}

#[test]
fn listen_addr_maps_bare_port_to_every_interface() {
    assert_eq!(listen_addr(":2480"), "0.0.0.0:2480");
    assert_eq!(listen_addr("127.0.0.1:0"), "127.0.0.1:0");
}

#[test]
fn jetstream_urls_of_any_scheme_become_the_subscribe_socket() {
    let cfg = run(
        &[],
        &[(
            "TAP_JETSTREAM_URL",
            "https://jetstream2.us-east.bsky.network",
        )],
    )
    .unwrap();
    let LiveSource::Jetstream(js) = cfg.live_source else {
        panic!("expected Jetstream")
    };
    assert_eq!(
        js.url.as_str(),
        "wss://jetstream2.us-east.bsky.network/subscribe"
    );
    assert_eq!((js.verify, js.proof_rate), (JetstreamVerify::Proof, 10));
    for (given, expected) in [
        (
            "ws://127.0.0.1:6008/subscribe?x=1",
            "ws://127.0.0.1:6008/subscribe",
        ),
        ("http://127.0.0.1:6008", "ws://127.0.0.1:6008/subscribe"),
        ("wss://js.example/other/path", "wss://js.example/subscribe"),
    ] {
        assert_eq!(jetstream_subscribe_url(given).unwrap().as_str(), expected);
    }
    assert_eq!(
        invalid_flag(&["--jetstream-url=ftp://x"], &[]).flag,
        "jetstream-url"
    );
    let cfg = run(
        &["--jetstream-url=ws://h:1", "--jetstream-verify=none"],
        &[],
    )
    .unwrap();
    assert!(matches!(
        cfg.live_source,
        LiveSource::Jetstream(JetstreamConfig {
            verify: JetstreamVerify::None,
            ..
        })
    ));
    assert_eq!(
        invalid_flag(
            &["--jetstream-url=ws://h:1", "--jetstream-verify=maybe"],
            &[]
        )
        .flag,
        "jetstream-verify"
    );
    assert_eq!(run(&[], &[]).unwrap().live_source, LiveSource::Relay);
}

#[test]
fn jetstream_is_refused_for_a_full_network_mirror_in_one_line() {
    let e = invalid_flag(&["--jetstream-url=ws://h:1", "--full-network"], &[]);
    assert_eq!(e.flag, "jetstream-url");
    let line = e.to_string();
    assert!(
        line.contains("--full-network") && !line.contains('\n'),
        "{line}"
    );
}

#[test]
fn light_rail_lists_its_own_signal_collections_and_nothing_else_combines_with_them() {
    let cfg = run(
        &[
            "--light-rail-url=http://lightrail:1",
            "--light-rail-signal-collections=app.bsky.graph.starterpack,app.bsky.graph.list",
        ],
        &[],
    )
    .unwrap();
    assert_eq!(cfg.light_rail_url.unwrap().as_str(), "http://lightrail:1/");
    assert_eq!(
        cfg.scope,
        TrackingScope::SignalCollections(vec![
            "app.bsky.graph.starterpack".parse().unwrap(),
            "app.bsky.graph.list".parse().unwrap()
        ])
    );
    let cfg = run(
        &[],
        &[
            ("TAP_LIGHT_RAIL_URL", "http://lightrail:1"),
            ("TAP_SIGNAL_COLLECTION", "app.bsky.graph.starterpack"),
        ],
    )
    .unwrap();
    assert!(cfg.light_rail_url.is_some());
    for (args, flag) in [
        (
            vec!["--light-rail-signal-collections=a.b.c"],
            "light-rail-signal-collections",
        ),
        (
            vec![
                "--light-rail-url=http://l:1",
                "--light-rail-signal-collections=a.b.c",
                "--signal-collection=d.e.f",
            ],
            "light-rail-signal-collections",
        ),
        (
            vec![
                "--light-rail-url=http://l:1",
                "--light-rail-signal-collections=a.b.c",
                "--full-network",
            ],
            "light-rail-signal-collections",
        ),
        (vec!["--light-rail-url=http://l:1"], "light-rail-url"),
    ] {
        assert_eq!(invalid_flag(&args, &[]).flag, flag, "{args:?}");
    }
}
