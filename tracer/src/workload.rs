//! Workload names for processes on this host. The process name (comm) says little for an
//! interpreter: two Python services are both `python3`. As Beyla and OBI do, a process's
//! `OTEL_SERVICE_NAME` wins; an interpreter is named by the script or module it runs; anything
//! else by its process name.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::event::Task;

/// Processes remembered; the cache starts over when full (names are cheap to read again).
const CAPACITY: usize = 8192;

/// Process names (or their prefixes, for versioned binaries such as `python3.11`) of
/// interpreters, whose first argument names the program.
const INTERPRETERS: &[&str] = &[
    "python", "node", "ruby", "perl", "php", "java", "bun", "deno", "dotnet",
];

/// Per process: the comm it had when named (a new one means it exec'd) and its name.
type Cache = HashMap<u32, ([u8; 16], Arc<str>)>;

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

/// The workload name of a process on this host.
pub fn name(task: &Task) -> Arc<str> {
    // Not kept: the thread's name is missing (`threads`), not the process's.
    if task.comm.0[0] == 0 {
        return "[unknown]".into();
    }
    let mut guard = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let cache = guard.get_or_insert_with(HashMap::new);
    if let Some((comm, name)) = cache.get(&task.tgid)
        && *comm == task.comm.0
    {
        return name.clone();
    }
    let comm = task.comm.as_str();
    let name: Arc<str> = resolve(task.tgid, &comm).into();
    if cache.len() >= CAPACITY {
        cache.clear();
    }
    cache.insert(task.tgid, (task.comm.0, name.clone()));
    name
}

fn resolve(tgid: u32, comm: &str) -> String {
    if comm.is_empty() {
        return "[unknown]".to_owned();
    }
    if let Ok(env) = std::fs::read(format!("/proc/{tgid}/environ"))
        && let Some(v) = env
            .split(|&b| b == 0)
            .find_map(|kv| kv.strip_prefix(b"OTEL_SERVICE_NAME="))
            .filter(|v| !v.is_empty())
    {
        return String::from_utf8_lossy(v).into_owned();
    }
    if INTERPRETERS.iter().any(|i| comm.starts_with(i))
        && let Ok(cmdline) = std::fs::read(format!("/proc/{tgid}/cmdline"))
    {
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if let Some(program) = program_of(&args) {
            return program;
        }
    }
    comm.to_owned()
}

/// The program an interpreter's command line runs: `python3 -m http.server` -> `http.server`,
/// `python3 /srv/app/frontend.py 8080` -> `frontend`, `java -jar orders.jar` -> `orders`,
/// `java -cp x com.shop.Orders` -> `Orders`.
fn program_of(args: &[String]) -> Option<String> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-m" | "-jar" => {
                let target = it.next()?;
                return Some(if a == "-m" {
                    target.clone()
                } else {
                    stem(target)
                });
            }
            // Options whose value is the next argument.
            "-c" | "-e" | "--eval" => return None,
            "-cp" | "-classpath" | "--class-path" | "-W" | "-X" | "-r" | "--require" => {
                it.next();
            }
            _ if a.starts_with('-') => {}
            _ => {
                let s = stem(a);
                // A Java main class: its last component.
                return Some(match s.rsplit_once('.') {
                    Some((_, class)) if !a.contains('/') && !class.is_empty() => class.to_owned(),
                    _ => s,
                });
            }
        }
    }
    None
}

/// A path's file name without its extension.
fn stem(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    match file.rsplit_once('.') {
        Some((stem, ext))
            if !stem.is_empty()
                && matches!(
                    ext,
                    "py" | "js" | "mjs" | "cjs" | "ts" | "rb" | "pl" | "php" | "jar"
                ) =>
        {
            stem.to_owned()
        }
        _ => file.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::program_of;

    fn p(args: &[&str]) -> Option<String> {
        program_of(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn names_interpreted_programs() {
        assert_eq!(
            p(&["python3", "-m", "http.server", "8000"]).as_deref(),
            Some("http.server")
        );
        assert_eq!(
            p(&["python3", "-u", "/srv/frontend.py", "8080"]).as_deref(),
            Some("frontend")
        );
        assert_eq!(p(&["node", "server.js"]).as_deref(), Some("server"));
        assert_eq!(
            p(&["java", "-Xmx1g", "-jar", "/opt/orders.jar"]).as_deref(),
            Some("orders")
        );
        assert_eq!(
            p(&["java", "-cp", "a.jar:b.jar", "com.shop.Orders"]).as_deref(),
            Some("Orders")
        );
        assert_eq!(p(&["python3", "-c", "print(1)"]), None);
        assert_eq!(p(&["python3"]), None);
    }
}
