use super::*;

mod basics {
    use super::*;
    use crate::model::DevAddr;

    const GOOD: &str = r#"
[gateway]
listen = "127.0.0.1:1700"

[storage]
path = "/tmp/x"

[[application]]
id = "farm"

[[device]]
application = "farm"
id = "soil-1"
dev_eui = "70b3d57ed0000001"
dev_addr = "26000001"
nwk_s_key = "000102030405060708090A0B0C0D0E0F"
app_s_key = "000102030405060708090a0b0c0d0e0f"

[[stream]]
name = "cloud"
kind = "mqtt"
server = "mqtt://127.0.0.1:1883"
application = "farm"
username = "gw"
password = "s3cret"
"#;

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD, "t.toml").unwrap();
        assert_eq!(c.gateway.dedup_window_ms, 200);
        assert_eq!(c.storage.flush_every_ms, 100);
        assert_eq!(c.storage.when_full, WhenFull::DropOldest);
        let d = &c.devices[0];
        assert!(matches!(
            d.activation,
            Activation::Abp {
                dev_addr: DevAddr(0x2600_0001),
                ..
            }
        ));
        let s = &c.streams[0];
        assert_eq!(s.scope, Scope::Application("farm".into()));
        assert!(s.downlinks);
        let printed = c.to_toml_masked();
        assert!(printed.contains("***"), "{printed}");
        assert!(!printed.contains("s3cret"));
        assert!(!printed.to_lowercase().contains("0102030405"));
    }

    #[test]
    fn empty_config_is_valid_defaults() {
        let c = Config::parse("", "t.toml").unwrap();
        assert_eq!(c.gateway.listen.to_string(), "0.0.0.0:1700");
        assert_eq!(
            c.metrics.listen.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:9100")
        );
    }

    fn err_of(src: &str) -> String {
        Config::parse(src, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = err_of(&GOOD.replace("dev_addr = \"26000001\"", "dev_addr = \"2600001\""));
        assert!(e.starts_with("t.toml:15:"), "{e}");
        assert!(e.contains("expected 8 hex digits, got 7"), "{e}");

        let e = err_of(&GOOD.replace(
            "application = \"farm\"\nid = \"soil-1\"",
            "application = \"farn\"\nid = \"soil-1\"",
        ));
        assert!(
            e.starts_with("t.toml:12: [[device]] \"soil-1\": key `application`"),
            "{e}"
        );
        assert!(e.contains("unknown application \"farn\""), "{e}");

        let e = err_of(&GOOD.replace("[storage]", "[storage]\nflush_evry_ms = 3"));
        assert!(e.starts_with("t.toml:6:"), "{e}");
        assert!(e.contains("unknown field `flush_evry_ms`"), "{e}");

        let e = err_of(&GOOD.replace("password = \"s3cret\"", "url = \"http://x\""));
        assert!(
            e.contains("t.toml:25: [[stream]] \"cloud\": key `url`: not used by kind = \"mqtt\""),
            "{e}"
        );

        let e = err_of(&GOOD.replace("mqtt://127", "tcp://127"));
        assert!(e.contains("key `server`"), "{e}");

        let e = err_of(&GOOD.replace("nwk_s_key = \"000102030405060708090A0B0C0D0E0F\"\n", ""));
        assert!(e.contains("key `nwk_s_key`"), "{e}");
        assert!(
            !e.contains("0102030405"),
            "keys never appear in errors: {e}"
        );

        let e = err_of(
            &GOOD
                .replace("when_full", "x")
                .replace("[storage]", "[storage]\nwhen_full = \"drop_newest\""),
        );
        assert!(e.contains("unknown variant `drop_newest`"), "{e}");

        let e = err_of(&GOOD.replace("[storage]", "[storage]\nbackend = \"rocksdb\""));
        assert!(e.starts_with("t.toml:6:"), "{e}");
        assert!(
            e.contains("unknown variant `rocksdb`, expected `sled` or `redb`"),
            "{e}"
        );
        let sled = GOOD.replace("[storage]", "[storage]\nbackend = \"sled\"");
        #[cfg(feature = "sled")]
        {
            let c = Config::parse(&sled, "t.toml").unwrap();
            assert_eq!(c.storage.backend, StorageBackend::Sled);
            assert!(c.to_toml_masked().contains("backend = \"sled\""));
        }
        #[cfg(not(feature = "sled"))]
        {
            let e = err_of(&sled);
            assert!(e.starts_with("t.toml:6: [storage] key `backend`"), "{e}");
            assert!(e.contains("cargo feature `sled`"), "{e}");
        }
    }
}

mod http_tests {
    use super::*;

    const BASE: &str =
        "[[application]]\nid = \"farm\"\n\n[[stream]]\nname = \"hook\"\nkind = \"http\"\n";

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(&format!("{BASE}{extra}"), "t.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_http_stream_is_valid_and_its_headers_are_masked() {
        let c = parse(
            "url = \"https://example.com/up\"\nheaders = { \"X-Api-Key\" = \"k3y-s3cret\", Authorization = \"Bearer t0ken\" }\n\
             batch_max = 50\nbatch_wait_ms = 0\ntimeout_s = 10\non_client_error = \"drop\"\n\
             poll_url = \"https://example.com/down?code=x\"\npoll_interval_s = 5\n\
             ca_file = \"/etc/ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"c.key\"\n",
        )
        .unwrap();
        let printed = c.to_toml_masked();
        assert!(
            !printed.contains("k3y-s3cret") && !printed.contains("t0ken"),
            "{printed}"
        );
        assert!(
            printed.contains("https://example.com/down?***"),
            "{printed}"
        );
        assert!(
            printed.contains("url = \"https://example.com/up\""),
            "{printed}"
        );
    }

    #[test]
    fn http_mistakes_name_the_key() {
        let e = |extra: &str| parse(extra).unwrap_err();
        assert!(
            e("").contains("key `url`: kind = \"http\" needs url"),
            "{}",
            e("")
        );
        assert!(e("url = \"ftp://x/\"\n").contains("key `url`"));
        assert!(e("url = \"not a url\"\n").contains("is not a URL"));
        let ok = "url = \"http://127.0.0.1:8080/up\"\n";
        assert!(e(&format!("{ok}poll_url = \"mqtt://x\"\n")).contains("key `poll_url`"));
        assert!(e(&format!(
            "{ok}poll_url = \"http://x/p\"\ndownlinks = false\n"
        ))
        .contains("downlinks = false"));
        assert!(e(&format!("{ok}poll_interval_s = 5\n")).contains("set poll_url too"));
        assert!(e(&format!("{ok}batch_max = 0\n")).contains("key `batch_max`"));
        assert!(e(&format!("{ok}timeout_s = 0\n")).contains("key `timeout_s`"));
        assert!(e(&format!("{ok}on_client_error = \"ignore\"\n")).contains("`retry` or `drop`"));
        assert!(e(&format!("{ok}cert_file = \"c.pem\"\n")).contains("go together"));
        assert!(e(&format!("{ok}headers = {{ \"Bad Name\" = \"v\" }}\n"))
            .contains("not a valid HTTP header name"));
        assert!(e(&format!(
            "{ok}headers = {{ \"Content-Type\" = \"text/plain\" }}\n"
        ))
        .contains("set by lorastream"));
        let secret_err = e(&format!("{ok}headers = {{ \"X-Key\" = \"abc\\ndef\" }}\n"));
        assert!(
            secret_err.contains("line break") && !secret_err.contains("abc"),
            "{secret_err}"
        );
        assert!(e(&format!("{ok}server = \"mqtt://x\"\n")).contains("not used by kind = \"http\""));
    }
}

mod example_tests {
    use super::*;

    /// config.example.toml stays valid, and its sections show the real defaults.
    #[test]
    fn example_config_is_valid_and_matches_defaults() {
        let src = include_str!("../../config.example.toml");
        let c = Config::parse(src, "config.example.toml").unwrap();
        let d = Config::default();
        let same = |a: &dyn erased::Ser, b: &dyn erased::Ser| a.json() == b.json();
        assert!(
            same(&c.gateway, &d.gateway),
            "[gateway] defaults differ from the example"
        );
        assert!(
            same(&c.storage, &d.storage),
            "[storage] defaults differ from the example"
        );
        assert!(
            same(&c.metrics, &d.metrics),
            "[metrics] defaults differ from the example"
        );
        assert!(
            same(&c.log, &d.log),
            "[log] defaults differ from the example"
        );
    }

    /// The Debian package's /etc/lorastream/lorastream.toml (packaging/lorastream.toml): valid,
    /// the store in the state directory the unit allows, UDP and metrics on loopback only, and
    /// a stream that needs no broker (the package test starts the service with it).
    #[test]
    fn packaged_config_starts_on_a_fresh_gateway() {
        let src = include_str!("../../packaging/lorastream.toml");
        let c = Config::parse(src, "lorastream.toml").unwrap();
        assert_eq!(c.storage.path, std::path::Path::new(STATE_DIR));
        assert!(c.storage.outside_state_dir_note().is_none());
        assert!(c.gateway.listen.ip().is_loopback());
        assert!(c.metrics.listen.is_none_or(|a| a.ip().is_loopback()));
        assert_eq!(c.streams.len(), 1);
        assert_eq!(c.streams[0].kind.name(), "stdout");
        assert_eq!(c.devices.len(), 1);
    }

    mod erased {
        pub trait Ser {
            fn json(&self) -> String;
        }
        impl<T: serde::Serialize> Ser for T {
            fn json(&self) -> String {
                serde_json::to_string(self).unwrap_or_default()
            }
        }
    }
}

mod typed {
    use super::*;

    #[test]
    fn an_error_in_metrics_listen_names_its_own_line() {
        let src = "[gateway]\nlisten = \"0.0.0.0:1700\"\n\n[metrics]\nlisten = \"nowhere\"\n";
        let e = Config::parse(src, "t.toml").unwrap_err().to_string();
        assert!(e.starts_with("t.toml:5: [metrics] key `listen`"), "{e}");
        let src = "[metrics]\nlisten = \"127.0.0.1:9100\"\n\n[gateway]\nlisten = \"x\"\n";
        let e = Config::parse(src, "t.toml").unwrap_err().to_string();
        assert!(e.starts_with("t.toml:5: [gateway] key `listen`"), "{e}");
        // A cross-field error is placed in its section too.
        let src = "[metrics]\nlisten = \"\"\n[gateway]\nregion = \"EU868\"\nsub_band = 2\n";
        let e = Config::parse(src, "t.toml").unwrap_err().to_string();
        assert!(e.starts_with("t.toml:5: [gateway] key `sub_band`"), "{e}");
    }

    #[test]
    fn runtime_worker_threads_defaults_to_one_and_is_bounded() {
        let c = Config::parse("", "t.toml").unwrap();
        assert_eq!(c.runtime.worker_threads, 1);
        assert_eq!(c.runtime.workers(), Some(1));
        let c = Config::parse("[runtime]\nworker_threads = 0\n", "t.toml").unwrap();
        assert_eq!(c.runtime.workers(), None, "0 = tokio's one per core");
        let c = Config::parse("[runtime]\nworker_threads = 4\n", "t.toml").unwrap();
        assert_eq!(c.runtime.workers(), Some(4));
        assert!(c.to_toml_masked().contains("[runtime]\nworker_threads = 4"));
        let src = "[log]\nlevel = \"info\"\n\n[runtime]\nworker_threads = 65\n";
        let e = Config::parse(src, "t.toml").unwrap_err().to_string();
        assert!(
            e.starts_with("t.toml:5: [runtime] key `worker_threads`: 65 is more than 64"),
            "{e}"
        );
        let e = Config::parse("[runtime]\nworker_threads = -1\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.toml:2:"), "{e}");
        let e = Config::parse("[runtime]\nthreads = 2\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `threads`"), "{e}");
    }

    #[test]
    fn only_an_unwritten_metrics_listen_falls_back_from_node_exporters_port() {
        let ports = |src: &str| -> Vec<String> {
            Config::parse(src, "t.toml")
                .unwrap()
                .metrics
                .candidates()
                .iter()
                .map(|a| a.to_string())
                .collect()
        };
        let fallback = ["127.0.0.1:9100", "127.0.0.1:9101", "127.0.0.1:9102"];
        assert_eq!(ports(""), fallback);
        assert_eq!(ports("[metrics]\n"), fallback);
        assert_eq!(
            ports("[metrics]\nlisten = \"127.0.0.1:9100\"\n"),
            ["127.0.0.1:9100"]
        );
        assert_eq!(
            ports("[metrics]\nlisten = \"0.0.0.0:9200\"\n"),
            ["0.0.0.0:9200"]
        );
        assert!(ports("[metrics]\nlisten = \"\"\n").is_empty());
        // Set in code (as the tests do): used as set.
        let mut c = Config::parse("", "t.toml").unwrap();
        c.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
        assert_eq!(c.metrics.candidates().len(), 1);
    }

    #[test]
    fn extra_channels_are_checked_against_the_region() {
        let parse = |g: &str| Config::parse(&format!("[gateway]\n{g}\n"), "t.toml");
        let c = parse("extra_channels = [868.8, 869.0]").unwrap();
        assert_eq!(
            c.gateway.extra_channels_hz(),
            vec![868_800_000, 869_000_000]
        );
        assert!(parse("extra_channels = []")
            .unwrap()
            .gateway
            .extra_channels_hz()
            .is_empty());
        assert_eq!(
            Config::default().gateway.extra_channels_hz(),
            vec![
                867_100_000,
                867_300_000,
                867_500_000,
                867_700_000,
                867_900_000
            ]
        );
        for (g, want) in [
            ("extra_channels = [915.2]", "outside EU868's band"),
            ("extra_channels = [868.1]", "already a channel"),
            ("extra_channels = [867.1, 867.1]", "already a channel"),
            (
                "extra_channels = [863.1,863.3,863.5,863.7,863.9,864.1,864.3,864.5,864.7,864.9,865.1,865.3,865.5,865.7]",
                "at most 13 more",
            ),
            (
                "region = \"US915\"\nextra_channels = [903.0]",
                "fixed channel plan",
            ),
        ] {
            let e = parse(g).unwrap_err().to_string();
            assert!(e.contains("[gateway] key `extra_channels`"), "{e}");
            assert!(e.contains(want), "{g}: {e}");
        }
    }

    #[test]
    fn values_are_parsed_once_into_types() {
        let c = Config::parse(
            "[gateway]\nnet_id = \"00001a\"\n[storage]\nmax_age = \"2h\"\n[metrics]\nlisten = \"\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.gateway.net_id.0, 0x1A);
        assert_eq!(
            c.storage.max_age,
            Some(std::time::Duration::from_secs(7200))
        );
        assert_eq!(c.metrics.listen, None);
        let e = Config::parse("[gateway]\nnet_id = \"1a\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.toml:2: [gateway] key `net_id`"), "{e}");
        let e = Config::parse("[storage]\nmax_age = \"soon\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.toml:2: [storage] key `max_age`"), "{e}");
        let e = Config::parse("[log]\nlevel = \"lorastream=loud\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.toml:2: [log] key `level`"), "{e}");
    }

    #[test]
    fn check_prints_every_effective_value_with_defaults_and_no_secret() {
        let src = "[gateway]\neui = \"AA555A0000000000\"\n\n[[application]]\nid = \"farm\"\n\n\
                   [[device]]\napplication = \"farm\"\nid = \"m\"\ndev_eui = \"0000000000000007\"\napp_key = \"000102030405060708090a0b0c0d0e0f\"\n\n\
                   [[stream]]\nname = \"cloud\"\nserver = \"mqtts://gw:pw@broker.example\"\nusername = \"gw\"\npassword = \"hunter2\"\n\n\
                   [[stream]]\nname = \"hook\"\nkind = \"http\"\nurl = \"https://x.example/up?code=K3Y\"\nheaders = { \"X-Key\" = \"t0ken\" }\n\n\
                   [[stream]]\nname = \"az\"\nkind = \"azure-iot-hub\"\nhostname = \"hub.azure-devices.net\"\npolicy_name = \"p\"\npolicy_key = \"c2VjcmV0\"\n";
        let c = Config::parse(src, "t.toml").unwrap();
        let out = c.to_toml_masked();
        for secret in ["hunter2", "pw@", "K3Y", "t0ken", "c2VjcmV0", "0102030405"] {
            assert!(!out.contains(secret), "{secret} printed:\n{out}");
        }
        // Defaults that used to live in stream code are printed.
        for want in [
            "client_id = \"lorastream-aa555a0000000000-cloud-<instance id>\"",
            "clean_session = false",
            "topic_prefix = \"lorastream\"",
            "inflight = 100",
            "keep_alive_s = 30",
            "batch_max = 100",
            "batch_wait_ms = 200",
            "timeout_s = 30",
            "on_client_error = \"retry\"",
            "identity = \"device\"",
            "device_id = \"{device}\"",
            "server = \"mqtts://hub.azure-devices.net:8883\"",
            "sas_ttl_s = 3600",
            "idle_timeout_s = 300",
            "max_connections = 100",
            "inflight = 32",
            "keep_alive_s = 60",
            "downlink_format = \"json\"",
            "when_full = \"drop_oldest\"",
            "downlinks = true",
            "lorawan_version = \"1.0.3\"",
            "dedup_window_ms = 200",
            "max_age = \"\"",
            "net_id = \"000000\"",
        ] {
            assert!(out.contains(want), "{want} missing:\n{out}");
        }
        // What is printed is a valid configuration again.
        assert!(out.contains("app_key = \"***\""), "{out}");
    }

    #[test]
    fn a_misplaced_key_names_the_keys_the_kind_takes() {
        let e = Config::parse(
            "[[stream]]\nname = \"f\"\nkind = \"file\"\npath = \"/tmp/x\"\nserver = \"mqtt://x\"\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("t.toml:5: [[stream]] \"f\": key `server`: not used by kind = \"file\" (it takes: path)"),
            "{e}"
        );
    }

    #[test]
    fn a_device_is_abp_or_otaa() {
        let base = "[[application]]\nid = \"a\"\n[[device]]\napplication = \"a\"\nid = \"d\"\ndev_eui = \"0000000000000001\"\n";
        let both = format!("{base}dev_addr = \"26000001\"\nnwk_s_key = \"00000000000000000000000000000000\"\napp_s_key = \"00000000000000000000000000000000\"\napp_key = \"00000000000000000000000000000000\"\n");
        let e = Config::parse(&both, "t.toml").unwrap_err().to_string();
        assert!(e.contains("key `app_key`") && e.contains("not both"), "{e}");
        let otaa = format!("{base}join_eui = \"0000000000000002\"\napp_key = \"00000000000000000000000000000000\"\n");
        let c = Config::parse(&otaa, "t.toml").unwrap();
        assert!(matches!(
            c.devices[0].activation,
            Activation::Otaa {
                join_eui: Some(_),
                ..
            }
        ));
    }
}

mod format_tests {
    use super::*;

    /// A config whose only stream (line 5 on) is `stream`.
    fn parse(stream: &str) -> Result<Config, String> {
        let src = format!("[[application]]\nid = \"farm\"\n\n[[stream]]\nname = \"s\"\n{stream}\n");
        Config::parse(&src, "t.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn every_format_parses_and_check_prints_it() {
        let dir = tempfile::tempdir().unwrap();
        let tpl = dir.path().join("tb.j2");
        std::fs::write(&tpl, "{\"f_cnt\": {{ uplink_message.f_cnt }}}").unwrap();
        for (stream, want) in [
            ("server = \"mqtt://x\"", "format = \"tts\""),
            (
                "server = \"mqtt://x\"\nformat = \"chirpstack\"",
                "format = \"chirpstack\"",
            ),
            ("kind = \"stdout\"\nformat = \"xml\"", "format = \"xml\""),
            (
                &format!(
                    "kind = \"http\"\nurl = \"http://x/\"\nformat = \"template\"\ntemplate_file = {:?}",
                    tpl.display().to_string()
                ),
                "content_type = \"text/plain; charset=utf-8\"",
            ),
        ] {
            let c = parse(stream).unwrap_or_else(|e| panic!("{stream}: {e}"));
            let out = c.to_toml_masked();
            assert!(out.contains(want), "{want} missing:\n{out}");
        }
        let c = parse(&format!(
            "kind = \"http\"\nurl = \"http://x/\"\nformat = \"template\"\ntemplate_file = {:?}\ncontent_type = \"text/csv\"",
            tpl.display().to_string()
        ))
        .unwrap();
        let FormatConfig::Template(t) = &c.streams[0].format else {
            panic!("{:?}", c.streams[0].format)
        };
        assert_eq!(t.content_type, "text/csv");
        assert_eq!(t.file, tpl);
        assert!(c
            .to_toml_masked()
            .contains(&format!("template_file = {:?}", tpl.display().to_string())));
    }

    #[test]
    fn format_mistakes_name_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let e =
            parse("server = \"mqtt://x\"\ngateway = \"*\"\nformat = \"chirpstack\"").unwrap_err();
        assert!(
            e.starts_with("t.toml:8: [[stream]] \"s\": key `format`: ChirpStack's integration events are about devices"),
            "{e}"
        );
        let e = parse("server = \"mqtt://x\"\nformat = \"json\"").unwrap_err();
        assert!(e.starts_with("t.toml:7:"), "{e}");
        assert!(
            e.contains("expected one of `tts`, `chirpstack`, `xml`, `template`"),
            "{e}"
        );
        let e = parse("server = \"mqtt://x\"\ntemplate_file = \"/x.j2\"").unwrap_err();
        assert!(
            e.starts_with("t.toml:7: [[stream]] \"s\": key `template_file`: is only used with format = \"template\""),
            "{e}"
        );
        let e =
            parse("kind = \"stdout\"\nformat = \"xml\"\ncontent_type = \"text/xml\"").unwrap_err();
        assert!(
            e.contains("key `content_type`: is only used with format = \"template\"; format = \"xml\" sends application/xml"),
            "{e}"
        );
        let e = parse("kind = \"stdout\"\nformat = \"template\"").unwrap_err();
        assert!(
            e.contains("key `template_file`: format = \"template\" needs"),
            "{e}"
        );
        let missing = dir.path().join("nope.j2");
        let e = parse(&format!(
            "kind = \"stdout\"\nformat = \"template\"\ntemplate_file = {:?}",
            missing.display().to_string()
        ))
        .unwrap_err();
        assert!(
            e.starts_with("t.toml:8: [[stream]] \"s\": key `template_file`: cannot read"),
            "{e}"
        );

        // A template error: the config's file:line:key, then the template's file:line.
        let bad = dir.path().join("bad.j2");
        std::fs::write(&bad, "{\"a\": 1,\n \"b\": {{ uplnk_message.f_cnt }}}").unwrap();
        let e = parse(&format!(
            "kind = \"stdout\"\nformat = \"template\"\ntemplate_file = {:?}",
            bad.display().to_string()
        ))
        .unwrap_err();
        let want = format!(
            "t.toml:8: [[stream]] \"s\": key `template_file`: {}:2: unknown variable \"uplnk_message\"",
            bad.display()
        );
        assert!(e.starts_with(&want), "{e}");
        std::fs::write(&bad, "ok\n{% for x in uplink_message.rx_metadata %}").unwrap();
        let e = parse(&format!(
            "kind = \"stdout\"\nformat = \"template\"\ntemplate_file = {:?}",
            bad.display().to_string()
        ))
        .unwrap_err();
        assert!(
            e.contains(&format!("{}:2: template syntax error", bad.display())),
            "{e}"
        );

        let good = dir.path().join("good.j2");
        std::fs::write(&good, "{{ received_at }}").unwrap();
        let e = parse(&format!(
            "kind = \"stdout\"\nformat = \"template\"\ntemplate_file = {:?}\ncontent_type = \"text/csv\"",
            good.display().to_string()
        ))
        .unwrap_err();
        assert!(
            e.contains("key `content_type`: has no effect on kind = \"stdout\""),
            "{e}"
        );
        for ct in ["json", "text/", "text/plain\nx", "a b/c"] {
            let e = parse(&format!(
                "kind = \"http\"\nurl = \"http://x/\"\nformat = \"template\"\ntemplate_file = {:?}\ncontent_type = {ct:?}",
                good.display().to_string()
            ))
            .unwrap_err();
            assert!(e.contains("key `content_type`: "), "{ct:?}: {e}");
        }
    }
}

mod devices_dir {
    use super::*;

    const MAIN: &str = r#"
[gateway]
devices_dir = "devices.d"

[[application]]
id = "farm"

[[device]]
application = "farm"
id = "soil-1"
dev_eui = "70b3d57ed0000001"
app_key = "000102030405060708090a0b0c0d0e0f"
"#;

    fn device(id: &str, eui: &str) -> String {
        format!(
            "[[device]]\napplication = \"farm\"\nid = \"{id}\"\ndev_eui = \"{eui}\"\ndev_addr = \"26000002\"\nnwk_s_key = \"000102030405060708090a0b0c0d0e0f\"\napp_s_key = \"000102030405060708090a0b0c0d0e0f\"\n\n"
        )
    }

    /// A config file with MAIN in a temp dir, and `files` in its devices.d.
    fn setup(files: &[(&str, String)]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("devices.d")).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join("devices.d").join(name), text).unwrap();
        }
        let main = dir.path().join("lorastream.toml");
        std::fs::write(&main, MAIN).unwrap();
        (dir, main)
    }

    #[test]
    fn files_are_merged_sorted_and_other_files_ignored() {
        let (_d, main) = setup(&[
            ("b.toml", device("b-1", "70b3d57ed00000b1")),
            (
                "a.toml",
                device("a-1", "70b3d57ed00000a1") + &device("a-2", "70b3d57ed00000a2"),
            ),
            ("notes.txt", "not toml at all [[".into()),
            ("a.toml~", "backup [[".into()),
            (".x.toml.tmp", "partial [[".into()),
        ]);
        let c = Config::load(&main).unwrap();
        let ids: Vec<&str> = c.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["soil-1", "a-1", "a-2", "b-1"]);
        let counts: Vec<usize> = c.device_sources.iter().map(|s| s.devices).collect();
        assert_eq!(counts, [1, 2, 1]);
        let summary = c.device_sources_summary();
        assert!(summary.starts_with("1 devices from "), "{summary}");
        assert!(
            summary.contains("2 from ") && summary.contains("a.toml"),
            "{summary}"
        );
    }

    #[test]
    fn errors_name_the_devices_file_line_and_key() {
        let bad = device("a-1", "70b3d57ed00000a1").replace("26000002", "2600002");
        let (_d, main) = setup(&[("a.toml", bad)]);
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(
            e.contains("a.toml:5:") && e.contains("key `dev_addr`"),
            "{e}"
        );

        let unknown = device("a-1", "70b3d57ed00000a1").replace("dev_eui", "deveui");
        let (_d, main) = setup(&[("a.toml", unknown)]);
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(e.contains("a.toml:") && e.contains("deveui"), "{e}");

        let app = device("a-1", "70b3d57ed00000a1").replace("\"farm\"", "\"barn\"");
        let (_d, main) = setup(&[("a.toml", app)]);
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(
            e.contains("a.toml:2:") && e.contains("key `application`") && e.contains("barn"),
            "{e}"
        );

        // Only [[device]] tables belong in a devices file.
        let (_d, main) = setup(&[("a.toml", "[[application]]\nid = \"x\"\n".into())]);
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(e.contains("a.toml:1") && e.contains("application"), "{e}");
    }

    #[test]
    fn duplicates_across_files_are_refused_where_written_second() {
        let (_d, main) = setup(&[
            ("a.toml", device("x", "70b3d57ed00000a1")),
            ("b.toml", device("y", "70b3d57ed00000a1")),
        ]);
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(
            e.contains("b.toml:4:") && e.contains("key `dev_eui`") && e.contains("a.toml"),
            "{e}"
        );
        let (_d, main) = setup(&[("b.toml", device("soil-1", "70b3d57ed00000b1"))]);
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(
            e.contains("b.toml:3:") && e.contains("key `id`") && e.contains("lorastream.toml"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_directory_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("lorastream.toml");
        std::fs::write(&main, MAIN).unwrap();
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(
            e.contains("lorastream.toml:3: [gateway] key `devices_dir`") && e.contains("devices.d"),
            "{e}"
        );
    }
}

mod example_keys {
    /// The keys a section accepts, as serde lists them for an unknown one (every section
    /// denies unknown fields).
    fn accepted(section: &str) -> Vec<String> {
        let src = format!("{section}\nzz_not_a_key = 1\n");
        let e = match toml::from_str::<super::super::RawFile>(&src) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{section}: an unknown key was accepted"),
        };
        let list = e
            .split("expected one of ")
            .nth(1)
            .or_else(|| e.split("expected ").nth(1))
            .unwrap_or_else(|| panic!("{section}: {e}"));
        list.split(',')
            .map(|k| k.trim().trim_matches('`').trim().to_string())
            .filter(|k| !k.is_empty() && !k.contains(' '))
            .collect()
    }

    /// config.example.toml shows every key of every section (set, or commented out with its
    /// default), so an operator finds them all in one file.
    #[test]
    fn the_example_lists_every_key() {
        let example = include_str!("../../config.example.toml");
        let shown = |k: &str| {
            example.lines().any(|l| {
                let l = l.trim_start().trim_start_matches('#').trim_start();
                l.strip_prefix(k)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
        };
        let mut missing = Vec::new();
        for section in [
            "[gateway]",
            "[storage]",
            "[metrics]",
            "[log]",
            "[[application]]",
            "[[device]]",
            "[[stream]]",
            "[[alert]]",
        ] {
            for k in accepted(section) {
                if !shown(&k) {
                    missing.push(format!("{section} {k}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "not in config.example.toml: {missing:?}"
        );
    }
}

mod codecs {
    use super::*;

    const BASE: &str = r#"[gateway]
listen = "127.0.0.1:1700"

[[application]]
id = "farm"
codec = "cayennelpp"

[[device]]
application = "farm"
id = "soil-1"
dev_eui = "70b3d57ed0000001"
dev_addr = "26000001"
nwk_s_key = "000102030405060708090A0B0C0D0E0F"
app_s_key = "000102030405060708090a0b0c0d0e0f"
"#;

    fn err_of(src: &str, path: &str) -> String {
        Config::parse(src, path).unwrap_err().to_string()
    }

    #[test]
    fn devices_take_their_applications_codec_unless_they_set_their_own() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lht65.js"), "function decodeUplink(i){}").unwrap();
        let path = dir.path().join("l.toml");
        let path = path.to_str().unwrap();
        let c = Config::parse(BASE, path).unwrap();
        assert_eq!(c.codec_of(&c.devices[0]), CodecConfig::CayenneLpp);
        assert_eq!(c.gateway.codec_timeout_ms, 100);
        // A device's own codec; a relative script is taken from the file's directory.
        let src = format!("{BASE}codec = \"javascript\"\ncodec_script = \"lht65.js\"\n");
        #[cfg(feature = "js")]
        {
            let c = Config::parse(&src, path).unwrap();
            assert_eq!(
                c.codec_of(&c.devices[0]),
                CodecConfig::JavaScript {
                    script: dir.path().join("lht65.js")
                }
            );
            let printed = c.to_toml_masked();
            assert!(printed.contains("codec = \"javascript\""), "{printed}");
            assert!(printed.contains("codec = \"cayennelpp\""), "{printed}");
        }
        // A build without JavaScript says so, at the entry's `codec`.
        #[cfg(not(feature = "js"))]
        {
            let e = Config::parse(&src, path).unwrap_err().to_string();
            assert!(e.contains("[[device]] \"soil-1\": key `codec`"), "{e}");
            assert!(
                e.contains("this build has no JavaScript codecs: rebuild with --features js"),
                "{e}"
            );
        }
        let src = format!("{BASE}codec = \"none\"\n");
        let c = Config::parse(&src, path).unwrap();
        assert_eq!(c.codec_of(&c.devices[0]), CodecConfig::None);
        // No codec anywhere: none.
        let c = Config::parse(&BASE.replace("codec = \"cayennelpp\"\n", ""), path).unwrap();
        assert_eq!(c.codec_of(&c.devices[0]), CodecConfig::None);
    }

    #[test]
    fn codec_mistakes_are_refused_with_file_line_and_key() {
        let e = err_of(&BASE.replace("\"cayennelpp\"", "\"cayenne\""), "t.toml");
        assert!(
            e.starts_with("t.toml:6: [[application]] \"farm\": key `codec`"),
            "{e}"
        );
        assert!(e.contains("cayennelpp"), "{e}");
        let e = err_of(&BASE.replace("\"cayennelpp\"", "\"javascript\""), "t.toml");
        assert!(
            e.starts_with("t.toml:6: [[application]] \"farm\": key `codec`"),
            "{e}"
        );
        if cfg!(feature = "js") {
            assert!(e.contains("needs codec_script"), "{e}");
        } else {
            assert!(e.contains("this build has no JavaScript codecs"), "{e}");
        }
        let e = err_of(
            &BASE.replace(
                "\"cayennelpp\"",
                "\"javascript\"\ncodec_script = \"/nonexistent/x.js\"",
            ),
            "t.toml",
        );
        if cfg!(feature = "js") {
            assert!(
                e.starts_with("t.toml:7: [[application]] \"farm\": key `codec_script`"),
                "{e}"
            );
            assert!(e.contains("cannot read /nonexistent/x.js"), "{e}");
        } else {
            assert!(
                e.starts_with("t.toml:6: [[application]] \"farm\": key `codec`"),
                "{e}"
            );
        }
        let e = err_of(&format!("{BASE}codec_script = \"x.js\"\n"), "t.toml");
        assert!(
            e.starts_with("t.toml:15: [[device]] \"soil-1\": key `codec_script`"),
            "{e}"
        );
        let e = err_of(
            &format!("{BASE}codec = \"cayennelpp\"\ncodec_script = \"x.js\"\n"),
            "t.toml",
        );
        assert!(e.contains("only used with codec = \"javascript\""), "{e}");
        let e = err_of(&format!("{BASE}codec = \"lua\"\n"), "t.toml");
        assert!(
            e.starts_with("t.toml:15: [[device]] \"soil-1\": key `codec`"),
            "{e}"
        );
        let e = err_of(
            &BASE.replace("[gateway]\n", "[gateway]\ncodec_timeout_ms = 0\n"),
            "t.toml",
        );
        assert!(
            e.starts_with("t.toml:2: [gateway] key `codec_timeout_ms`"),
            "{e}"
        );
    }
}
