//! Property tests ("fuzz targets" on stable Rust) for `shoal service create`'s flags: any
//! mix of flag values goes through clap and `build_spec`, and ends as a usage error, one error
//! line, or a spec the control API accepts (numbers, ports and timers are the CLI's to check;
//! names, images, constraints and env pass through verbatim and the server names what is wrong).
//!
//! Cases: [`CASES`], or `PROPTEST_CASES` for a longer local run
//! (`PROPTEST_CASES=100000 cargo nextest run -p shoal fuzz`).

use clap::Parser;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use shoal_manager::controlapi::validate;

use super::{build_spec, ServiceCommand};

/// Flag combinations tried in CI (a clap parse and a spec build each; about 7 s on a loaded
/// 2-core machine in a debug build).
const CASES: u32 = 1_000;

#[derive(Parser)]
#[command(name = "service")]
struct Cli {
    #[command(subcommand)]
    command: ServiceCommand,
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES)
}

fn pick(values: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::sample::select(values).prop_map(String::from),
        1 => "[ -~]{0,12}",
        1 => "\\PC{0,6}",
    ]
    .boxed()
}

const DURATIONS: &[&str] = &[
    "0",
    "5s",
    "500ms",
    "1h30m",
    "1.5s",
    "0.0001ms",
    "1e3s",
    "99999999999999999999d",
    "999999999999d",
    "213503982334601d",
    "-1s",
    "1..5s",
    "s",
    "1x",
    "nan",
    "inf",
    "1h1h",
    " 2m ",
    "1 s",
    "366d",
    "365d",
];
const SIZES: &[&str] = &[
    "512m",
    "1g",
    "0",
    "100k",
    "1tb",
    "-1",
    "-0",
    "nan",
    "inf",
    "-inf",
    "1e30g",
    "8e18",
    "9223372036854775807",
    "9223372036854775808",
    "0x10",
    "",
    "b",
    "m",
    "1.5g",
    "1e-9",
];
const CPUS: &[&str] = &[
    "0.5", "2", "0", "-0", "nan", "inf", "1e9", "1000000", "1000001", "1e-12", "",
];
const PORTS: &[&str] = &[
    "published=8080,target=80,mode=host",
    "target=80,mode=host",
    "published=53,target=53,protocol=udp,mode=host",
    "target=0,mode=host",
    "target=80,mode=bogus",
    "published=80,target=80,protocol=sctp,mode=host",
    "80",
    "8080:80",
    "0",
    "0:80",
    "80:0",
    "65535",
    "65536",
    "70000:80",
    "80/udp",
    "80/sctp",
    "80/xyz",
    "80/",
    "/tcp",
    "a:b",
    ":80",
    "80:",
    "4294967296",
    "1:2:3",
    "-1",
];
const MOUNTS: &[&str] = &[
    "type=volume,source=data,target=/d",
    "type=bind,source=/srv,target=/s,readonly",
    "target=/anon",
    "target=/anon,readonly",
    "type=volume,source=a/b,target=/d",
    "type=bind,source=rel,target=/d",
    "type=bind,target=/d",
    "type=volume,source=data,target=rel",
    "type=volume,source=data,target=/",
    "type=volume,source=data,target=/a/../b",
    "type=tmpfs,target=/t",
    "type=volume,source=data,target=/d,volume-nocopy,volume-label=k=v",
    "type=bind,source=/x,target=/d,volume-nocopy",
    "source=data,target=/d,ro=maybe",
    "source=data,target=/d,\"x",
    "type=volume,source=data",
    "",
];
const KVS: &[&str] = &["k=v", "=v", "k", "k=v=w", "", "a.b/c=ü", "x=\n"];
const ENVS: &[&str] = &["A=B", "=x", "", "A", "PATH=/bin", "A=\0"];
const CONSTRAINTS: &[&str] = &[
    "node.role==manager",
    "node.labels.zone!=east",
    "node.rol==x",
    "==",
    "node.hostname==",
    "",
    "node.labels.==a",
];
const PREFS: &[&str] = &[
    "spread=node.labels.zone",
    "spread=",
    "spread=node.id",
    "zone",
    "spread=node.labels.",
];
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "100000",
    "100001",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "x",
    "",
];
const RATIOS: &[&str] = &["0", "0.5", "1", "1.0001", "-0.1", "nan", "inf", "x"];
const NAMES: &[&str] = &["web", "a", "-bad", "x.y_z-1", "UPPER", ""];
const IMAGES: &[&str] = &[
    "busybox:1.36",
    "busybox",
    "Busybox",
    "busybox@sha256:00",
    "registry:5000/a/b:c",
    "",
];

/// One `--flag value` pair (or a bare switch), as argv words.
fn flag() -> BoxedStrategy<Vec<String>> {
    let with = |f: &'static str, v: BoxedStrategy<String>| {
        v.prop_map(move |v| vec![f.to_string(), v]).boxed()
    };
    prop_oneof![
        with("--name", pick(NAMES)),
        with("--mode", pick(&["replicated", "global", "x"])),
        with("--replicas", pick(NUMBERS)),
        with("--env", pick(ENVS)),
        with("--label", pick(KVS)),
        with("--container-label", pick(KVS)),
        with("--constraint", pick(CONSTRAINTS)),
        with("--placement-pref", pick(PREFS)),
        with("--replicas-max-per-node", pick(NUMBERS)),
        with("--workdir", pick(&["/w", "", "rel"])),
        with("--user", pick(&["0:0", "nobody", ""])),
        with("--hostname", pick(&["h", ""])),
        with("--limit-cpu", pick(CPUS)),
        with("--reserve-cpu", pick(CPUS)),
        with("--limit-memory", pick(SIZES)),
        with("--reserve-memory", pick(SIZES)),
        with("--limit-pids", pick(NUMBERS)),
        with(
            "--restart-condition",
            pick(&["none", "on-failure", "any", "always"])
        ),
        with("--restart-delay", pick(DURATIONS)),
        with("--restart-max-attempts", pick(NUMBERS)),
        with("--restart-window", pick(DURATIONS)),
        with("--update-parallelism", pick(NUMBERS)),
        with("--update-delay", pick(DURATIONS)),
        with(
            "--update-failure-action",
            pick(&["pause", "continue", "rollback", "x"])
        ),
        with("--update-order", pick(&["stop-first", "start-first", "x"])),
        with("--update-monitor", pick(DURATIONS)),
        with("--update-max-failure-ratio", pick(RATIOS)),
        with("--stop-grace-period", pick(DURATIONS)),
        with("--publish", pick(PORTS)),
        with("--mount", pick(MOUNTS)),
        with("--network", pick(&["n", "", "host", "none"])),
        with("--health-cmd", pick(&["exit 0", "", " ", "-x"])),
        with(
            "--entrypoint",
            pick(&["sh -c 'exit 3'", "'open", "", "/bin/app --x", "a\\"])
        ),
        with("--health-interval", pick(DURATIONS)),
        with("--health-timeout", pick(DURATIONS)),
        with("--health-start-period", pick(DURATIONS)),
        with("--health-retries", pick(NUMBERS)),
        Just(vec!["--no-healthcheck".to_string()]).boxed(),
        Just(vec!["--read-only".to_string()]).boxed(),
        Just(vec!["--detach".to_string()]).boxed(),
    ]
    .boxed()
}

/// What the server may refuse in a spec the CLI built: text the CLI passes through verbatim.
const SERVER_CHECKS: &[&str] = &[
    "service name",
    "image",
    "constraint",
    "environment variable",
    "label",
    "placement preference",
    "more than the limit",
    "longer than the limit",
];

#[test]
fn service_create_flags_give_an_error_line_or_a_valid_spec() {
    let strategy = (
        prop::collection::vec(flag(), 0..10),
        pick(IMAGES),
        prop::collection::vec(pick(&["sh", "-c", "--", "echo hi"]), 0..3),
    );
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
    .run(&strategy, |(flags, image, command)| {
        let mut argv = vec!["service".to_string(), "create".to_string()];
        argv.extend(flags.into_iter().flatten());
        argv.push(image);
        argv.extend(command);
        let args = match Cli::try_parse_from(&argv) {
            Err(_) => return Ok(()), // a usage error: clap prints it, exit 2
            Ok(Cli { command: ServiceCommand::Create(a) }) => a,
            Ok(_) => return Err(TestCaseError::fail("parsed as another command")),
        };
        match build_spec(&args) {
            Err(e) => {
                let line = format!("{e:#}");
                prop_assert!(!line.is_empty() && !line.contains('\n'), "error is not one line: {:?}", line);
            }
            Ok(spec) => {
                if let Err(e) = validate::service_spec(&spec) {
                    prop_assert!(
                        SERVER_CHECKS.iter().any(|c| e.0.contains(c)),
                        "the CLI built a spec the server refuses for a number it parsed: {} (argv {:?})",
                        e,
                        argv
                    );
                }
            }
        }
        Ok(())
    })
    .unwrap();
}

/// The unit parsers never saturate: a value they accept is the value the text says.
#[test]
fn unit_parsers_refuse_what_does_not_fit_and_keep_what_does() {
    use super::super::output::{parse_bytes, parse_cpus, parse_duration_ms};
    let units = prop::sample::select(vec![
        ("ms", 1u64),
        ("s", 1_000),
        ("m", 60_000),
        ("h", 3_600_000),
        ("d", 86_400_000),
    ]);
    let sizes = prop::sample::select(vec![
        ("", 1i64),
        ("k", 1 << 10),
        ("m", 1 << 20),
        ("g", 1 << 30),
        ("t", 1 << 40),
    ]);
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
    .run(
        &(
            any::<u32>(),
            units,
            sizes,
            "[-+.0-9a-z ]{0,24}",
            any::<f64>(),
        ),
        |(n, (unit, ms), (suffix, mult), junk, float)| {
            prop_assert_eq!(
                parse_duration_ms(&format!("{n}{unit}")).ok(),
                Some(u64::from(n) * ms)
            );
            let want = i64::from(n).checked_mul(mult).filter(|v| *v < i64::MAX);
            prop_assert_eq!(parse_bytes(&format!("{n}{suffix}")).ok(), want);
            for s in [
                junk.clone(),
                format!("{float}"),
                format!("{float}d"),
                format!("{float}g"),
                format!("{junk}{n}"),
            ] {
                if let Ok(v) = parse_duration_ms(&s) {
                    prop_assert!(v < u64::MAX, "{:?} saturated to {}", s, v);
                }
                if let Ok(v) = parse_bytes(&s) {
                    prop_assert!((0..i64::MAX).contains(&v), "{:?} became {}", s, v);
                    let f: f64 = s
                        .trim()
                        .trim_end_matches(['k', 'm', 'g', 't', 'b'])
                        .parse()
                        .unwrap_or(0.0);
                    prop_assert!(f.is_finite(), "{:?} is not a finite size but gave {}", s, v);
                }
                if let Ok(v) = parse_cpus(&s) {
                    prop_assert!(
                        (0..=1_000_000_000_000_000).contains(&v),
                        "{:?} became {} nano-cpus",
                        s,
                        v
                    );
                }
            }
            for s in ["nan", "inf", "-inf", "NaN", "1e400", "infinity"] {
                prop_assert!(parse_bytes(s).is_err(), "{} accepted as a size", s);
                prop_assert!(parse_cpus(s).is_err(), "{} accepted as cpus", s);
            }
            prop_assert!(parse_duration_ms("99999999999999999999d").is_err());
            Ok(())
        },
    )
    .unwrap();
}

#[test]
fn network_flags_take_names_and_aliases() {
    use super::networks;
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (names, aliases) = networks(&s(&["a", "name=b,alias=db,alias=x"])).unwrap();
    assert_eq!(names, vec!["a", "b"]);
    assert_eq!(aliases.len(), 1);
    assert_eq!(
        (aliases[0].network.as_str(), &aliases[0].aliases[..]),
        ("b", &s(&["db", "x"])[..])
    );
    for (bad, want) in [
        (&["name=a,alias="][..], "expected NAME"),
        (&["alias=x"], "no name="),
        (&["name=a,colour=red"], "expected NAME"),
        (&["a", "name=a"], "given twice"),
        (&["name=host,alias=x"], "takes no aliases"),
        (&["host", "a"], "only network"),
        (&[""], "empty network name"),
    ] {
        let e = networks(&s(bad)).unwrap_err().to_string();
        assert!(e.contains(want), "{bad:?}: {e}");
    }
}

#[test]
fn entrypoint_is_split_into_shell_words() {
    let spec = |argv: &[&str]| {
        let mut all = vec!["service", "create"];
        all.extend_from_slice(argv);
        let Cli {
            command: ServiceCommand::Create(a),
        } = Cli::try_parse_from(&all).unwrap()
        else {
            panic!("not create")
        };
        build_spec(&a)
    };
    let c = spec(&["--entrypoint", "/bin/sh -c 'echo \"a b\"'", "busybox", "x"])
        .unwrap()
        .task
        .unwrap()
        .container
        .unwrap();
    assert_eq!(c.command, ["/bin/sh", "-c", "echo \"a b\""]);
    assert_eq!(c.args, ["x"]);
    let e = spec(&["--entrypoint", "sh -c 'open", "busybox"]).unwrap_err();
    assert!(format!("{e:#}").starts_with("--entrypoint: "), "{e:#}");
}

/// `service ps|ls` and `node ps` filters: any strings end as filters or one line of error.
#[test]
fn list_filters_parse_or_fail_on_one_line() {
    const FILTERS: &[&str] = &[
        "desired-state=running",
        "desired-state=shutdown",
        "desired-state=accepted",
        "desired-state=",
        "node=host1",
        "name=web.1",
        "id=abc",
        "label=tier",
        "label=tier=front",
        "label=",
        "mode=global",
        "mode=replicated",
        "mode=",
        "=",
        "",
        "name",
    ];
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        ..Config::default()
    });
    runner
        .run(&prop::collection::vec(pick(FILTERS), 0..4), |filters| {
            for e in [
                super::parse_ps_filters(&filters).err(),
                super::LsFilter::parse(&filters).err(),
            ]
            .into_iter()
            .flatten()
            {
                let text = format!("{e:#}");
                prop_assert!(!text.contains('\n'), "{text}");
                prop_assert!(text.starts_with("invalid filter"), "{text}");
            }
            Ok(())
        })
        .unwrap();
}
