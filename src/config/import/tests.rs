//! The converters on export samples written after the real formats (tests/data/import/).

use super::*;

fn sample(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/import")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn key(hex: &str) -> AesKey {
    hex.parse().unwrap()
}

fn by_id<'a>(devices: &'a [Imported], id: &str) -> &'a Imported {
    devices
        .iter()
        .find(|d| d.id == id)
        .unwrap_or_else(|| panic!("{id} not imported: {devices:?}"))
}

fn skipped<'a>(reports: &'a [Report], device: &str) -> &'a str {
    let r = reports
        .iter()
        .find(|r| r.device.starts_with(device))
        .unwrap_or_else(|| panic!("no report for {device}: {reports:?}"));
    assert!(!r.imported, "{device} should be skipped: {r}");
    &r.message
}

fn farm() -> Vec<String> {
    vec!["farm".to_string()]
}

#[test]
fn formats_are_detected_from_content() {
    assert_eq!(
        detect(&sample("tts-end-devices.json")),
        Some(Format::TtsJson)
    );
    assert_eq!(
        detect(&sample("tts-end-devices.jsonl")),
        Some(Format::TtsJson)
    );
    assert_eq!(detect(&sample("tts-end-devices.csv")), Some(Format::TtsCsv));
    assert_eq!(
        detect(&sample("chirpstack-devices.json")),
        Some(Format::ChirpStack)
    );
    assert_eq!(detect("{\"hello\": 1}"), None);
    assert_eq!(detect("name,description\nx,y\n"), None);
}

#[test]
fn tts_json_otaa_abp_and_what_is_missing() {
    let c = convert(&sample("tts-end-devices.json"), Format::TtsJson).unwrap();
    assert_eq!(c.len(), 5);
    let (devices, reports) = select(c, None, &farm(), Taken::default());
    assert_eq!(devices.len(), 2, "{reports:?}");

    let soil = by_id(&devices, "soil-1");
    assert_eq!(soil.application, "farm");
    assert_eq!(soil.dev_eui.to_string(), "70B3D57ED0051001");
    assert_eq!(soil.lorawan_version, Some(LorawanVersion::V1_0_3));
    match &soil.keys {
        Keys::Otaa { join_eui, app_key } => {
            assert_eq!(join_eui.to_string(), "70B3D57ED0000010");
            assert_eq!(*app_key, key("9B35FAFC785474A8CF1CE995A77629D2"));
        }
        k => panic!("soil-1 should be OTAA: {k:?}"),
    }

    let valve = by_id(&devices, "valve-1");
    assert!(valve.class_c && valve.resets_f_cnt);
    assert_eq!(valve.lorawan_version, Some(LorawanVersion::V1_0_2));
    match &valve.keys {
        Keys::Abp {
            dev_addr,
            nwk_s_key,
            app_s_key,
        } => {
            assert_eq!(dev_addr.to_string(), "260B1002");
            assert_eq!(*nwk_s_key, key("087FFD12C7707F44A609E6CA50C98EC8"));
            assert_eq!(*app_s_key, key("C4BB03090BCAA05854057E3C5102A6AE"));
        }
        k => panic!("valve-1 should be ABP: {k:?}"),
    }

    assert!(skipped(&reports, "tank-3").contains("encrypted"));
    assert!(skipped(&reports, "tank-3").contains("eu1-js-kek"));
    assert_eq!(skipped(&reports, "meter-9"), "OTAA device without app_key");
    assert!(skipped(&reports, "edge-11").contains("LoRaWAN 1.1"));
    // Reports never carry a key.
    let all: String = reports.iter().map(|r| r.to_string()).collect();
    for k in ["9B35FAFC", "087FFD12", "C4BB0309", "D7FC0590", "VGhpcy"] {
        assert!(!all.to_uppercase().contains(&k.to_uppercase()), "{all}");
    }
}

#[test]
fn tts_json_lines_and_applications() {
    let c = convert(&sample("tts-end-devices.jsonl"), Format::TtsJson).unwrap();
    // line-2 belongs to "orchard", which the configuration does not have.
    let (devices, reports) = select(c.clone(), None, &farm(), Taken::default());
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].lorawan_version, Some(LorawanVersion::V1_0_4));
    assert!(skipped(&reports, "line-2").contains("\"orchard\""));
    // --application puts every device into one application.
    let (devices, _) = select(c, Some("farm"), &farm(), Taken::default());
    assert_eq!(devices.len(), 2);
    assert!(devices.iter().all(|d| d.application == "farm"));
}

#[test]
fn tts_csv_template() {
    let c = convert(&sample("tts-end-devices.csv"), Format::TtsCsv).unwrap();
    assert_eq!(c.len(), 4);
    let (devices, reports) = select(c, None, &farm(), Taken::default());
    assert_eq!(devices.len(), 2, "{reports:?}");
    match &by_id(&devices, "csv-otaa-1").keys {
        Keys::Otaa { app_key, .. } => {
            assert_eq!(*app_key, key("501904FF71F9C573C8388235914B8589"))
        }
        k => panic!("{k:?}"),
    }
    // No id: named as TTS names it.
    let abp = by_id(&devices, "eui-70b3d57ed0052002");
    assert!(abp.class_c);
    assert!(
        matches!(abp.keys, Keys::Abp { nwk_s_key, .. } if nwk_s_key == key("CAD7F144ED7DA8D01AAF738E93136BD1"))
    );
    assert_eq!(
        skipped(&reports, "csv-nojoin"),
        "OTAA device without join_eui"
    );
    assert_eq!(
        skipped(&reports, "csv-abp-short"),
        "ABP device without app_s_key"
    );
}

#[test]
fn csv_quotes_separators_and_bad_rows() {
    let rows = csv::parse("a,b\n\"x, y\",\"say \"\"hi\"\"\"\n1,2\n").unwrap();
    assert_eq!(rows[1].1, ["x, y", "say \"hi\""]);
    assert_eq!(rows[2], (3, vec!["1".to_string(), "2".to_string()]));
    assert!(csv::parse("a;b\n1;2;3\n").unwrap_err().contains("line 2"));
    assert!(csv::parse("a;b\n\"1;2\n").is_err());
    let bad_key = "dev_eui;join_eui;app_key\n70B3D57ED0052009;70B3D57ED0000020;XYZ\n";
    let c = convert(bad_key, Format::TtsCsv).unwrap();
    let (devices, reports) = select(c, None, &farm(), Taken::default());
    assert!(devices.is_empty());
    let m = skipped(&reports, "eui-70b3d57ed0052009");
    assert!(m.contains("app_key") && !m.contains("XYZ"), "{m}");
}

#[test]
fn chirpstack_devices() {
    let c = convert(&sample("chirpstack-devices.json"), Format::ChirpStack).unwrap();
    assert_eq!(c.len(), 5);
    let (devices, reports) = select(c, None, &farm(), Taken::default());
    assert_eq!(devices.len(), 2, "{reports:?}");
    // "Meter 7" cannot be an id; the nwkKey is the 1.0.x AppKey.
    let meter = by_id(&devices, "eui-70b3d57ed0053001");
    match &meter.keys {
        Keys::Otaa { join_eui, app_key } => {
            assert_eq!(join_eui.to_string(), "70B3D57ED0000030");
            assert_eq!(*app_key, key("EEC841A2084B6D4572A72864EB36FC48"));
        }
        k => panic!("{k:?}"),
    }
    let pump = by_id(&devices, "pump-2");
    assert!(pump.class_c);
    assert!(
        matches!(pump.keys, Keys::Abp { dev_addr, nwk_s_key, app_s_key }
        if dev_addr.to_string() == "260B3002"
            && nwk_s_key == key("771B93459C432D45CBCDCD0902DF8D9A")
            && app_s_key == key("BD5C0A7E36E1E5D58C95B9AC5DFD9E0D"))
    );
    assert!(skipped(&reports, "gate-4").contains("without join_eui, app_key"));
    assert!(skipped(&reports, "old-5").contains("disabled"));
    assert!(skipped(&reports, "v11-6").contains("LoRaWAN 1.1"));
    // Two applications and no --application: nothing is guessed.
    let c = convert(&sample("chirpstack-devices.json"), Format::ChirpStack).unwrap();
    let two = vec!["farm".to_string(), "orchard".to_string()];
    let (devices, reports) = select(c, None, &two, Taken::default());
    assert!(devices.is_empty());
    assert!(skipped(&reports, "pump-2").contains("--application"));
}

#[test]
fn devices_already_configured_or_twice_in_the_export_are_skipped() {
    let c = convert(&sample("tts-end-devices.json"), Format::TtsJson).unwrap();
    let mut taken = Taken::default();
    taken.ids.insert("soil-1".into());
    taken.euis.insert("70B3D57ED0051002".parse().unwrap());
    let (devices, reports) = select(c, None, &farm(), taken);
    assert!(devices.is_empty());
    assert!(skipped(&reports, "soil-1").contains("id"));
    assert!(skipped(&reports, "valve-1").contains("DevEUI"));

    let twice = sample("tts-end-devices.jsonl").replace("line-2", "line-1");
    let c = convert(&twice, Format::TtsJson).unwrap();
    let (devices, _) = select(c, Some("farm"), &farm(), Taken::default());
    assert_eq!(devices.len(), 1);
}

#[test]
fn rendered_file_is_a_valid_devices_file() {
    let c = convert(&sample("tts-end-devices.json"), Format::TtsJson).unwrap();
    let (devices, _) = select(c, None, &farm(), Taken::default());
    let text = render(&devices, "from a test\nsecond line");
    assert!(text.starts_with("# from a test\n# second line\n"), "{text}");
    let src = super::super::locate::Source::new("x.toml", &text);
    let parsed = super::super::devices::parse_file(&src).unwrap();
    assert_eq!(parsed.len(), 2);
    assert_eq!(parsed[1].0.id, "valve-1");
    assert!(parsed[1].0.resets_f_cnt);
}
