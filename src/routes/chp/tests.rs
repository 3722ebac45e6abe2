//! The CHP backend without a CHP: route data, what reads back as ours, URLs, the hub's API.

use super::*;

fn client(api_url: &str) -> ChpClient {
    let config = ChpConfig {
        api_url: api_url.into(),
        ..ChpConfig::default()
    };
    ChpClient::from_config(&config, BaseUrl::new("/").unwrap()).unwrap()
}

#[test]
fn hub_api_from_config_or_the_managed_service_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("hub.token");
    crate::keys::write_private_file(&file, b"from-file\n").unwrap();
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    let service = env(&[
        ("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api/"),
        ("JUPYTERHUB_API_TOKEN", "from-env"),
    ]);
    let none = env(&[]);
    let base = ChpConfig::default();
    assert!(hub_api(&base, &none).unwrap().is_none());
    let (url, token) = hub_api(&base, &service).unwrap().unwrap();
    assert_eq!(
        (url.as_str(), token.expose()),
        ("http://127.0.0.1:8081/hub/api", "from-env")
    );
    // Keys win over the environment, each on its own.
    let keys = ChpConfig {
        hub_api_url: Some("http://hub:8081/hub/api".into()),
        hub_token_file: Some(file),
        ..ChpConfig::default()
    };
    let (url, token) = hub_api(&keys, &service).unwrap().unwrap();
    assert_eq!(
        (url.as_str(), token.expose()),
        ("http://hub:8081/hub/api", "from-file")
    );
    let url_only = ChpConfig {
        hub_api_url: Some("http://hub:8081/hub/api".into()),
        ..ChpConfig::default()
    };
    let (_, token) = hub_api(&url_only, &service).unwrap().unwrap();
    assert_eq!(token.expose(), "from-env");
    let err = hub_api(&url_only, &none).unwrap_err();
    assert!(format!("{err:#}").contains("go together"), "{err:#}");
    let half = env(&[("JUPYTERHUB_API_TOKEN", "t")]);
    assert!(hub_api(&base, &half).is_err());
}

#[test]
fn route_data_round_trips_and_only_our_stamped_routes_read_back() {
    let c = client("http://127.0.0.1:8001");
    let path = RoutePath::new(&BaseUrl::new("/").unwrap(), "alice", "gpu-1").unwrap();
    let entry = RouteEntry::new(path, Target::parse("http://127.0.0.1:20001").unwrap());
    let d = data(&entry);
    assert_eq!(
        d,
        json!({"target": "http://127.0.0.1:20001", "jupyterhub": true, "user": "alice",
               "server_name": "gpu-1", "tunnelbot": true})
    );
    assert_eq!(c.parse("/user/alice/gpu-1", &d), Some(entry));
    // CHP adds last_activity; extra keys do not matter.
    let mut seen = d.clone();
    seen["last_activity"] = json!("2026-01-01T00:00:00.000Z");
    assert!(c.parse("/user/alice/gpu-1", &seen).is_some());
    for key in ["tunnelbot", "jupyterhub", "target", "user", "server_name"] {
        let mut partial = d.clone();
        partial.as_object_mut().map(|o| o.remove(key));
        assert_eq!(
            c.parse("/user/alice/gpu-1", &partial),
            None,
            "without {key}"
        );
    }
    assert_eq!(c.parse("/", &d), None);
    assert_eq!(c.parse("/services/alice", &d), None);
}

#[test]
fn route_urls_are_built_segment_by_segment() {
    let c = client("http://127.0.0.1:8001");
    let url = |p: &str| c.route_url(p).map(|u| u.to_string());
    assert_eq!(url("").unwrap(), "http://127.0.0.1:8001/api/routes");
    assert_eq!(
        url("/user/a b@x.org/gpu").unwrap(),
        "http://127.0.0.1:8001/api/routes/user/a%20b@x.org/gpu"
    );
    assert_eq!(
        url("/user/a?b#c%2e").unwrap(),
        "http://127.0.0.1:8001/api/routes/user/a%3Fb%23c%252e"
    );
    for hostile in [
        "/user/..",
        "/user/.",
        "/user/alice/..",
        "/user//x",
        "/user/...",
        "/",
    ] {
        assert!(url(hostile).is_err(), "{hostile:?} was built");
    }
    let c = client("http://127.0.0.1:8001/prefix/");
    assert_eq!(
        c.route_url("/user/x").unwrap().path(),
        "/prefix/api/routes/user/x"
    );
}
