//! Checks requests against the Proxmox VE API schema (`tests/pve/pve-api-schema-9.1.3.json`, see
//! `tests/pve/README.md`).
//!
//! The schema is the `apidata.js` of pve-docs 9.1.3: a tree of nodes with a `path` and, per HTTP
//! method, the accepted `parameters.properties`, `returns`, `allowtoken` and `permissions`.
//! [`Schema::check`] tells whether one request (method, path below `/api2/json`, merged query/body
//! parameters, `Authorization` header) is one that a real PVE 9.1 would accept, with a message
//! naming the method, path, parameter and rule when it is not.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, OnceLock};

use regex::Regex;
use serde_json::{Map, Value};

use super::syntax::{
    check_format, compile_pattern, parse_bool, parse_integer, parse_number, parse_token_header,
};

/// Where the schema lives: vendored in the repository, next to this file.
pub const SCHEMA_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/pve/pve-api-schema-9.1.3.json"
);

/// One API path of the schema with its methods.
pub struct Endpoint {
    /// The path template, e.g. `/nodes/{node}/qemu/{vmid}/clone`.
    pub template: String,
    segments: Vec<Segment>,
    /// Method (`GET`, `POST`, …) → the schema's method object (`parameters`, `returns`, …).
    pub info: Map<String, Value>,
}

enum Segment {
    Literal(String),
    Param(String),
}

impl Endpoint {
    fn literal_count(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count()
    }

    fn matches(&self, segments: &[&str]) -> Option<BTreeMap<String, String>> {
        if segments.len() != self.segments.len() {
            return None;
        }
        let mut params = BTreeMap::new();
        for (want, got) in self.segments.iter().zip(segments) {
            match want {
                Segment::Literal(lit) if lit == got => {}
                Segment::Literal(_) => return None,
                Segment::Param(_) if got.is_empty() => return None,
                Segment::Param(name) => {
                    params.insert(name.clone(), (*got).to_string());
                }
            }
        }
        Some(params)
    }
}

/// A concrete path matched to its schema template.
pub struct PathMatch<'a> {
    pub endpoint: &'a Endpoint,
    /// Values of the `{…}` segments, by parameter name.
    pub path_params: BTreeMap<String, String>,
}

/// The Proxmox VE API schema, loaded once per test binary.
pub struct Schema {
    endpoints: Vec<Endpoint>,
    /// Schema patterns compiled by [`compile_pattern`], or why they could not be.
    patterns: Mutex<HashMap<String, Result<Regex, String>>>,
}

static SCHEMA: OnceLock<Schema> = OnceLock::new();

impl Schema {
    /// The schema, read from [`SCHEMA_PATH`] on first use. Panics when the file is missing or
    /// malformed: tests that depend on it must not pass silently without it.
    pub fn load() -> &'static Schema {
        SCHEMA.get_or_init(|| {
            let text = std::fs::read_to_string(SCHEMA_PATH).unwrap_or_else(|e| {
                panic!(
                    "Proxmox VE API schema missing: cannot read {SCHEMA_PATH}: {e} \
                     (it is committed in tests/pve/)"
                )
            });
            Schema::parse(&text)
                .unwrap_or_else(|e| panic!("Proxmox VE API schema {SCHEMA_PATH} malformed: {e}"))
        })
    }

    /// Builds a schema from the JSON text of the schema file.
    pub fn parse(text: &str) -> Result<Schema, String> {
        let root: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let nodes = root.as_array().ok_or("top level is not an array")?;
        let mut endpoints = Vec::new();
        collect(nodes, &mut endpoints)?;
        if endpoints.is_empty() {
            return Err("no API paths".into());
        }
        Ok(Schema {
            endpoints,
            patterns: Mutex::new(HashMap::new()),
        })
    }

    /// All API paths.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter()
    }

    /// The template matching `path` (below `/api2/json`, no query string); among several, the
    /// one with the most literal segments.
    pub fn match_path(&self, path: &str) -> Option<PathMatch<'_>> {
        let joined = join_fragments(&split_path(path));
        let segments: Vec<&str> = joined.iter().map(String::as_str).collect();
        self.endpoints
            .iter()
            .filter_map(|e| e.matches(&segments).map(|p| (e, p)))
            .max_by_key(|(e, _)| e.literal_count())
            .map(|(endpoint, path_params)| PathMatch {
                endpoint,
                path_params,
            })
    }

    /// The schema's method object for `method` on `path` (`parameters`, `returns`, …).
    pub fn method_info(&self, method: &str, path: &str) -> Option<&Value> {
        self.match_path(path)?
            .endpoint
            .info
            .get(&method.to_ascii_uppercase())
    }

    /// The schema's description of `method` on `path` when it says the method is deprecated.
    pub fn deprecation(&self, method: &str, path: &str) -> Option<&str> {
        let text = self
            .method_info(method, path)?
            .get("description")?
            .as_str()?;
        text.contains("deprecated").then_some(text)
    }

    /// The declared `returns` of `method` on `path`.
    pub fn returns(&self, method: &str, path: &str) -> Option<&Value> {
        self.method_info(method, path)?.get("returns")
    }

    /// Checks one request as PVE 9.1 would: known path and method, API-token authentication
    /// allowed and well-formed, every required parameter present, no unknown parameter, and
    /// each value valid for its type, enum, range, length, pattern and (some) formats.
    ///
    /// `path` is the part after `/api2/json`, without query string and already percent-decoded;
    /// `params` are the query or body parameters (decoded), without the path parameters.
    pub fn check(
        &self,
        method: &str,
        path: &str,
        params: &BTreeMap<String, String>,
        auth_header: Option<&str>,
    ) -> Result<(), String> {
        let (info, _) = self.method_and_params(method, path, params)?;
        let at = format!("{method} {path}");
        parse_token_header(auth_header).map_err(|e| format!("{at}: Authorization header: {e}"))?;
        if info.get("allowtoken").and_then(as_i64) != Some(1) {
            return Err(format!(
                "{at}: API tokens are not allowed to call this method (allowtoken is not 1)"
            ));
        }
        self.check_params(method, path, params)
    }

    /// [`Schema::check`] without the authentication part.
    pub fn check_params(
        &self,
        method: &str,
        path: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let (info, all) = self.method_and_params(method, path, params)?;
        let at = format!("{method} {path}");
        let props = info
            .pointer("/parameters/properties")
            .and_then(Value::as_object);
        let empty = Map::new();
        let props = props.unwrap_or(&empty);
        let additional = info
            .pointer("/parameters/additionalProperties")
            .and_then(as_i64)
            == Some(1);

        for (name, prop) in props {
            if name.ends_with("[n]") || prop.get("optional").and_then(as_i64) == Some(1) {
                continue;
            }
            if !all.contains_key(name) {
                return Err(format!(
                    "{at}: parameter '{name}': required parameter missing"
                ));
            }
        }
        for (name, value) in &all {
            let Some(prop) = lookup_property(props, name) else {
                if additional {
                    continue;
                }
                return Err(format!(
                    "{at}: parameter '{name}': unknown parameter (not in the schema)"
                ));
            };
            let bad = |rule: String| format!("{at}: parameter '{name}': value {value:?}: {rule}");
            match (
                prop.get("type").and_then(Value::as_str),
                value.contains('\0'),
            ) {
                // Repeated form parameters (or a JSON array): one item each.
                (Some("array"), _) => {
                    let items = prop.get("items").unwrap_or(&Value::Null);
                    for item in value.split('\0') {
                        self.check_value(items, item).map_err(bad)?;
                    }
                }
                (_, true) if is_list_format(prop) => {
                    self.check_value(prop, &value.replace('\0', ","))
                        .map_err(bad)?;
                }
                (kind, true) => {
                    return Err(bad(format!(
                        "given more than once: PVE makes that an array, and the type is {}",
                        kind.unwrap_or("string")
                    )));
                }
                _ => self.check_value(prop, value).map_err(bad)?,
            }
            if let Some(required) = prop.get("requires").and_then(Value::as_str)
                && !all.contains_key(required)
            {
                return Err(format!(
                    "{at}: parameter '{name}': requires parameter '{required}'"
                ));
            }
        }
        Ok(())
    }

    /// The parameters as PVE's RESTHandler hands them on (normalize_legacy_param_formats):
    /// repeated values of a `…-list` format joined by commas. Arrays stay NUL-joined.
    pub fn normalize(
        &self,
        method: &str,
        path: &str,
        mut params: BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let props = self
            .method_info(method, path)
            .and_then(|info| info.pointer("/parameters/properties"))
            .and_then(Value::as_object);
        if let Some(props) = props {
            for (name, value) in params.iter_mut() {
                if value.contains('\0') && lookup_property(props, name).is_some_and(is_list_format)
                {
                    *value = value.replace('\0', ",");
                }
            }
        }
        params
    }

    /// The method object and the request's parameters merged with the path parameters.
    fn method_and_params(
        &self,
        method: &str,
        path: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<(&Value, BTreeMap<String, String>), String> {
        let method = method.to_ascii_uppercase();
        let at = format!("{method} {path}");
        if path.contains('?') {
            return Err(format!(
                "{at}: path contains a query string: pass the parameters separately"
            ));
        }
        let Some(m) = self.match_path(path) else {
            return Err(format!("{at}: unknown API path (no schema path matches)"));
        };
        let Some(info) = m.endpoint.info.get(&method) else {
            let known: Vec<&str> = m.endpoint.info.keys().map(String::as_str).collect();
            return Err(format!(
                "{at}: method {method} not allowed on {} (schema has: {})",
                m.endpoint.template,
                known.join(", ")
            ));
        };
        let mut all = params.clone();
        for (name, value) in m.path_params {
            if let Some(given) = all.get(&name)
                && *given != value
            {
                return Err(format!(
                    "{at}: parameter '{name}': given as {given:?} but the path says {value:?}"
                ));
            }
            all.insert(name, value);
        }
        Ok((info, all))
    }

    /// Checks one value against its property schema; the error names the rule.
    fn check_value(&self, prop: &Value, value: &str) -> Result<(), String> {
        match prop.get("type").and_then(Value::as_str).unwrap_or("string") {
            "integer" => {
                let n = parse_integer(value).ok_or("not an integer")?;
                check_range(prop, n as f64)?;
            }
            "number" => {
                let n = parse_number(value).ok_or("not a number")?;
                check_range(prop, n)?;
            }
            "boolean" => {
                parse_bool(value).ok_or("not a boolean (use 0/1, true/false, yes/no, on/off)")?;
            }
            "string" => self.check_string(prop, value)?,
            // Arrays are checked item by item by the caller; objects are not form values.
            _ => {}
        }
        Ok(())
    }

    fn check_string(&self, prop: &Value, value: &str) -> Result<(), String> {
        if let Some(allowed) = prop.get("enum").and_then(Value::as_array)
            && !allowed.iter().any(|a| a.as_str() == Some(value))
        {
            let names: Vec<String> = allowed.iter().map(value_text).collect();
            return Err(format!("not one of the enum values [{}]", names.join(", ")));
        }
        let len = value.chars().count();
        if let Some(max) = prop.get("maxLength").and_then(as_i64)
            && len as i64 > max
        {
            return Err(format!("longer than maxLength {max} ({len} characters)"));
        }
        if let Some(min) = prop.get("minLength").and_then(as_i64)
            && (len as i64) < min
        {
            return Err(format!("shorter than minLength {min} ({len} characters)"));
        }
        if let Some(pattern) = prop.get("pattern").and_then(Value::as_str) {
            // A pattern the checker cannot translate rejects the value: never a silent pass.
            let re = self
                .pattern(pattern)
                .map_err(|e| format!("the schema pattern {pattern} cannot be checked: {e}"))?;
            if !re.is_match(value) {
                return Err(format!("does not match pattern {pattern}"));
            }
        }
        match prop.get("format") {
            Some(Value::String(format)) => check_format(format, value),
            Some(Value::Object(keys)) => self.check_property_string(keys, value),
            _ => Ok(()),
        }
    }

    /// A property string like `virtio=BC:24:11:00:00:01,bridge=vmbr0` against an inline format:
    /// known keys (or aliases), at most one bare value for the `default_key`, no duplicate key,
    /// and each value's type and enum. Patterns and formats inside are not checked.
    fn check_property_string(&self, keys: &Map<String, Value>, value: &str) -> Result<(), String> {
        let default_key = keys
            .iter()
            .find(|(_, p)| p.get("default_key").and_then(as_i64) == Some(1))
            .map(|(k, _)| k.as_str());
        let mut seen = Vec::new();
        for part in value.split(',') {
            let (key, val) = match part.split_once('=') {
                Some((k, v)) => (k, v),
                None => match default_key {
                    Some(k) => (k, part),
                    None => {
                        return Err(format!(
                            "property string part {part:?} has no key (and the format has no default key)"
                        ));
                    }
                },
            };
            let Some(mut sub) = keys.get(key) else {
                let names: Vec<&String> = keys.keys().collect();
                return Err(format!(
                    "property string key {key:?} unknown (known: {names:?})"
                ));
            };
            let mut canonical = key;
            if let Some(alias) = sub.get("alias").and_then(Value::as_str) {
                canonical = alias;
                sub = keys.get(alias).unwrap_or(sub);
            }
            if seen.contains(&canonical) {
                return Err(format!("property string key {canonical:?} given twice"));
            }
            seen.push(canonical);
            let ok = match sub.get("type").and_then(Value::as_str).unwrap_or("string") {
                "integer" => parse_integer(val).is_some(),
                "number" => parse_number(val).is_some(),
                "boolean" => parse_bool(val).is_some(),
                _ => sub
                    .get("enum")
                    .and_then(Value::as_array)
                    .is_none_or(|allowed| allowed.iter().any(|a| a.as_str() == Some(val))),
            };
            if !ok {
                return Err(format!(
                    "property string key {canonical:?}: invalid value {val:?}"
                ));
            }
        }
        Ok(())
    }

    /// Every distinct `pattern` of a method parameter in the schema.
    pub fn parameter_patterns(&self) -> BTreeSet<String> {
        self.endpoints
            .iter()
            .flat_map(|endpoint| endpoint.info.values())
            .filter_map(|info| {
                info.pointer("/parameters/properties")
                    .and_then(Value::as_object)
            })
            .flat_map(|props| props.values())
            .filter_map(|prop| prop.get("pattern").and_then(Value::as_str))
            .map(str::to_string)
            .collect()
    }

    /// The parameter patterns [`compile_pattern`] cannot translate, each with the reason.
    /// [`Schema::check`] rejects every value of a parameter with such a pattern.
    pub fn uncompilable_patterns(&self) -> Vec<(String, String)> {
        self.parameter_patterns()
            .into_iter()
            .filter_map(|pattern| {
                let error = self.pattern(&pattern).err()?;
                Some((pattern, error))
            })
            .collect()
    }

    /// [`compile_pattern`], cached.
    fn pattern(&self, pattern: &str) -> Result<Regex, String> {
        let mut cache = self.patterns.lock().unwrap();
        cache
            .entry(pattern.to_string())
            .or_insert_with(|| compile_pattern(pattern))
            .clone()
    }
}

fn collect(nodes: &[Value], out: &mut Vec<Endpoint>) -> Result<(), String> {
    for node in nodes {
        let path = node
            .get("path")
            .and_then(Value::as_str)
            .ok_or("node without path")?;
        let segments = split_path(path)
            .into_iter()
            .map(
                |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => Segment::Param(name.to_string()),
                    None => Segment::Literal(s.to_string()),
                },
            )
            .collect();
        let info = node
            .get("info")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        out.push(Endpoint {
            template: path.to_string(),
            segments,
            info,
        });
        if let Some(children) = node.get("children").and_then(Value::as_array) {
            collect(children, out)?;
        }
    }
    Ok(())
}

/// PVE mounts a storage's content below `/nodes/{node}/storage/{storage}/content` with an
/// empty fragment delimiter (pve-storage's API2/Storage/Status.pm), so the rest of the path is
/// one segment: volume IDs such as `local:import/x.qcow2` hold a `/`.
pub fn join_fragments(segments: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = segments.iter().map(|s| s.to_string()).collect();
    if matches!(segments, ["nodes", _, "storage", _, "content", _, _, ..]) {
        let rest = segments[5..].join("/");
        out.truncate(5);
        out.push(rest);
    }
    out
}

fn split_path(path: &str) -> Vec<&str> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        Vec::new()
    } else {
        trimmed.split('/').collect()
    }
}

/// The property for `name`, also when `name` is an instance of an indexed `NAME[n]` property
/// (`ipconfig0` for `ipconfig[n]`) within the index range the description gives.
fn lookup_property<'a>(props: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(prop) = props.get(name) {
        return Some(prop);
    }
    let digits_at = name.find(|c: char| c.is_ascii_digit())?;
    let (base, index) = name.split_at(digits_at);
    if !index.bytes().all(|b| b.is_ascii_digit()) || (index.len() > 1 && index.starts_with('0')) {
        return None;
    }
    let prop = props.get(&format!("{base}[n]"))?;
    let index: u64 = index.parse().ok()?;
    (index <= max_index(prop)).then_some(prop)
}

/// The largest index of an indexed property: from its description ("n is 0 to 30", "n can be
/// up to 14", "link0..link7"), else a generous 255 (PVE's largest, for `unused[n]`/`mp[n]`).
fn max_index(prop: &Value) -> u64 {
    let text = prop
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or("");
    let re = Regex::new(r"n is 0 to (\d+)|n can be up to (\d+)|[a-z]0\.\.[a-z]+(\d+)").unwrap();
    re.captures_iter(text)
        .filter_map(|c| c.iter().skip(1).flatten().next()?.as_str().parse().ok())
        .max()
        .unwrap_or(255)
}

/// A string property whose format is a list (`pve-configid-list`, `pve-storage-content-list`).
fn is_list_format(prop: &Value) -> bool {
    prop.get("type").and_then(Value::as_str).unwrap_or("string") == "string"
        && prop
            .get("format")
            .and_then(Value::as_str)
            .is_some_and(|f| f.ends_with("-list"))
}

fn check_range(prop: &Value, n: f64) -> Result<(), String> {
    if let Some(min) = prop.get("minimum").and_then(as_f64)
        && n < min
    {
        return Err(format!("below minimum {min}"));
    }
    if let Some(max) = prop.get("maximum").and_then(as_f64)
        && n > max
    {
        return Err(format!("above maximum {max}"));
    }
    Ok(())
}

/// Schema numbers are sometimes strings (`"minimum": "0"`).
fn as_f64(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str()?.parse().ok())
}

fn as_i64(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}

fn value_text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}
