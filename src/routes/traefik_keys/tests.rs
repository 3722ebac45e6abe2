//! The key layout against what JupyterHub's `TraefikRedisProxy` 2.1.0 writes, reading back,
//! and the rules and prefixes refused.

use super::*;

fn path(base: &str, user: &str, server: &str) -> RoutePath {
    RoutePath::new(&BaseUrl::new(base).unwrap(), user, server).unwrap()
}

fn layout() -> Layout {
    Layout::new("jupyterhub", "traefik", "http").unwrap()
}

/// The values JupyterHub 2.1.0's TraefikRedisProxy wrote for alice (shared notes), and what
/// escapism gives for characters the hub's quoting leaves alone.
#[test]
fn keys_as_jupyterhub_writes_them() {
    let alice = path("/", "alice", "");
    let entry = RouteEntry::new(
        alice.clone(),
        Target::parse("http://127.0.0.1:18123").unwrap(),
    );
    let pairs: HashMap<String, String> = layout().pairs(&entry).unwrap().into_iter().collect();
    let r = "router__2Fuser_2Falice_2F";
    let s = "service__2Fuser_2Falice_2F";
    for (k, v) in [
        (format!("jupyterhub/routes/{r}/routespec"), "/user/alice/"),
        (
            format!("jupyterhub/routes/{r}/target"),
            "http://127.0.0.1:18123",
        ),
        (format!("jupyterhub/routes/{r}/router"), r),
        (format!("jupyterhub/routes/{r}/service"), s),
        (format!("jupyterhub/routes/{r}/data/user"), "alice"),
        (format!("jupyterhub/routes/{r}/data/server_name"), ""),
        (format!("jupyterhub/routes/{r}/data/tunnelbot"), "true"),
        (
            format!("traefik/http/routers/{r}/rule"),
            "( PathPrefix(`/user/alice/`) || Path(`/user/alice`) )",
        ),
        (format!("traefik/http/routers/{r}/entryPoints/0"), "http"),
        (format!("traefik/http/routers/{r}/service"), s),
        (
            format!("traefik/http/services/{s}/loadBalancer/servers/0/url"),
            "http://127.0.0.1:18123",
        ),
        (
            format!("traefik/http/services/{s}/loadBalancer/passHostHeader"),
            "true",
        ),
    ] {
        assert_eq!(pairs.get(&k).map(String::as_str), Some(v), "{k}");
    }
    assert_eq!(pairs.len(), 12);
    // The delete names every key put writes, the stamp and the target first.
    let named = layout().named_keys(&alice);
    for k in pairs.keys() {
        assert!(named.contains(k), "{k}");
    }
    assert_eq!(named[0], format!("jupyterhub/routes/{r}/data/tunnelbot"));
    assert_eq!(named[1], format!("jupyterhub/routes/{r}/target"));

    let odd = path("/jh/", "a b@x.org_2f", "gpu-1");
    assert_eq!(routespec(&odd), "/jh/user/a%20b@x.org_2f/gpu-1/");
    assert_eq!(
        alias(&routespec(&odd), "router"),
        "router__2Fjh_2Fuser_2Fa_2520b_40x_2Eorg_5F2f_2Fgpu-1_2F"
    );
    assert_eq!(alias("/\u{e9}\u{1}/", "x"), "x__2F_C3_A9_1_2F");
}

#[test]
fn what_reads_back_as_ours() {
    let base = BaseUrl::new("/").unwrap();
    let entry = RouteEntry::new(
        path("/", "bob", "gpu"),
        Target::parse("http://127.0.0.1:20001").unwrap(),
    );
    let l = layout();
    let pairs = l.pairs(&entry).unwrap();
    let fields = |pairs: &[(String, String)]| -> (String, HashMap<String, String>) {
        let mut router = String::new();
        let mut f = HashMap::new();
        for (k, v) in pairs {
            if let Some((r, field)) = l.split(k) {
                router = r.to_owned();
                f.insert(field.to_owned(), v.clone());
            }
        }
        (router, f)
    };
    let read_back = |router: &str, f: &HashMap<String, String>| {
        let f: HashMap<&str, &str> = f.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        read(&base, router, &f)
    };
    let (router, f) = fields(&pairs);
    assert_eq!(read_back(&router, &f), Some(entry.clone()));
    // Without the stamp (the hub's own write), under another alias, or a routespec that is
    // not canonical or not a server route: not ours.
    for (field, value) in [
        ("data/tunnelbot", None),
        ("data/tunnelbot", Some("True")),
        ("routespec", Some("/user/bob/gpu")),
        ("routespec", Some("/user/%62ob/gpu/")),
        ("routespec", Some("/user/bob/")),
        ("routespec", Some("/hub/")),
        ("routespec", Some("/")),
        ("router", Some("router__2F")),
        ("target", Some("https://127.0.0.1:20001")),
        ("data/user", None),
    ] {
        let mut f = f.clone();
        match value {
            Some(v) => f.insert(field.into(), v.into()),
            None => f.remove(field),
        };
        assert_eq!(read_back(&router, &f), None, "{field} = {value:?}");
    }
    assert_eq!(read_back("router__2Fuser_2Fbob_2F", &f), None);
    let hub: HashMap<&str, &str> = [("data/hub", "true")].into();
    assert!(is_hub(&hub));
}

#[test]
fn rules_refuse_what_would_change_their_meaning() {
    assert_eq!(
        rule("/jh/user/a%20b@x.org/").unwrap(),
        "( PathPrefix(`/jh/user/a b@x.org/`) || Path(`/jh/user/a b@x.org`) )"
    );
    for bad in [
        "/user/x%60) || PathPrefix(%60/",
        "/user/x`/",
        "/user/{x:.*}/",
        "/user/%7Bx:.%2A%7D/",
        "/user/a}/",
        "/user/%zz/",
        "/",
        "user/x/",
    ] {
        assert!(rule(bad).is_err(), "{bad}");
    }
}

#[test]
fn prefixes_and_entrypoints() {
    let l = Layout::new("jh/", "tr", "web-1").unwrap();
    assert_eq!(l.routes_dir(), "jh/routes/");
    assert_eq!(
        l.split("jh/routes/router__2F/data/user"),
        Some(("router__2F", "data/user"))
    );
    assert_eq!(l.split("jhx/routes/a/b"), None);
    for (jh, tr, ep) in [
        ("", "traefik", "http"),
        ("j*", "traefik", "http"),
        ("jupyterhub", "traefik", "a b"),
        ("same", "same/", "http"),
        ("/jh", "traefik", "http"),
        ("a//b", "traefik", "http"),
    ] {
        assert!(Layout::new(jh, tr, ep).is_err(), "{jh} {tr} {ep}");
    }
}
