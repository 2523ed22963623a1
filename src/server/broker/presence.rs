//! Presence across instances on Redis: each instance keeps, under a short TTL, its
//! figures and a hash of its users' connection counts, and a sorted set names the
//! instances seen lately. Counts are summed when read, so one instance's crash takes its
//! part away within the TTL and nothing has to clean up after it.
//!
//! Every key carries the hash tag `{presence}`, so on a cluster they share one slot and
//! each script runs on one node. Writes come from each instance once a second with only
//! the users whose counts changed (see `core::presence`), so the cost is per change, not
//! per connection per second.

use redis::Script;

use super::{InstancePresence, OpenConnection, PresenceWrite};

/// The instances seen lately: member = instance id, score = when (ms).
pub(super) const INSTANCES_KEY: &str = "sse:{presence}:instances";

fn figures_key(instance: &str) -> String {
    format!("sse:{{presence}}:i:{instance}")
}

fn users_key(instance: &str) -> String {
    format!("sse:{{presence}}:u:{instance}")
}

/// Redis' own clock in ms: every instance's writes and reads are timed by the same clock,
/// so a skewed instance neither evicts the others nor looks stale itself.
const NOW_MS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// `KEYS`: instances, figures, users. `ARGV`: instance, ttl, figures, full (`1`: the pairs
/// are all of this instance's users), then `user, connections` pairs (connections as
/// [`encode_connections`] writes them; empty removes the user).
/// Returns 1 when the users hash existed before this write (a delta on a hash that
/// expired meanwhile, e.g. while Redis was away, asks the instance for a full write).
const WRITE_SCRIPT: &str = r"
local existed = redis.call('EXISTS', KEYS[3])
if ARGV[4] == '1' then redis.call('DEL', KEYS[3]) end
for i = 5, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[3], ARGV[i])
  else
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  end
end
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return existed
";

/// `KEYS`: instances. `ARGV`: ttl, user (empty: none). Returns `instance, figures,
/// connections, age` for each live instance (the user's connections, as written, and
/// without a user no figures: that read is the per-connect one and wants only them; age:
/// ms since its last write).
///
/// The per-instance keys are not in `KEYS`: which exist is known only here. They share
/// the `{presence}` hash tag with the instances key, so on a cluster they are on the node
/// the script runs on (while that slot migrates, a read may miss them: an instance then
/// looks absent for a tick).
const READ_SCRIPT: &str = r"
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf', 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  local instance = live[i]
  local figures = ''
  local connections = ''
  if ARGV[2] == '' then
    figures = redis.call('GET', 'sse:{presence}:i:' .. instance)
  else
    connections = redis.call('HGET', 'sse:{presence}:u:' .. instance, ARGV[2]) or ''
  end
  if figures then
    table.insert(out, instance)
    table.insert(out, figures)
    table.insert(out, connections)
    table.insert(out, now - tonumber(live[i + 1]))
  end
end
return out
";

/// `KEYS`: instances, figures, users. `ARGV`: instance. An instance that stops leaves.
const LEAVE_SCRIPT: &str = r"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
";

/// The three scripts, loaded once per broker.
pub(super) struct PresenceScripts {
    pub write: Script,
    pub read: Script,
    pub leave: Script,
}

impl Default for PresenceScripts {
    fn default() -> Self {
        Self {
            write: Script::new(&format!("{NOW_MS}{WRITE_SCRIPT}")),
            read: Script::new(&format!("{NOW_MS}{READ_SCRIPT}")),
            leave: Script::new(LEAVE_SCRIPT),
        }
    }
}

/// A script's keys and arguments, for either broker to run its way.
pub(super) struct Call {
    pub keys: Vec<String>,
    pub args: Vec<String>,
}

impl Call {
    /// The `EVALSHA` of `script` with these keys and arguments (the cluster's router runs
    /// it on the owner of the first key, loading the script on `NOSCRIPT`).
    pub fn evalsha(&self, script: &Script) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(self.keys.len());
        for key in &self.keys {
            cmd.arg(key);
        }
        for arg in &self.args {
            cmd.arg(arg);
        }
        cmd
    }

    /// The same as an invocation, for a single Redis (which loads it on `NOSCRIPT`).
    pub fn invocation<'a>(&self, script: &'a Script) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        for key in &self.keys {
            invocation.key(key);
        }
        for arg in &self.args {
            invocation.arg(arg);
        }
        invocation
    }
}

pub(super) fn write_call(write: &PresenceWrite<'_>) -> Call {
    let mut args = Vec::with_capacity(4 + 2 * write.users.len());
    args.extend([
        write.instance.to_string(),
        write.ttl.as_millis().to_string(),
        write.figures.to_string(),
        if write.full { "1" } else { "0" }.to_string(),
    ]);
    for (user, open) in write.users {
        args.push(user.to_string());
        args.push(encode_connections(open));
    }
    Call {
        keys: vec![
            INSTANCES_KEY.into(),
            figures_key(write.instance),
            users_key(write.instance),
        ],
        args,
    }
}

pub(super) fn read_call(user: Option<&str>, ttl: std::time::Duration) -> Call {
    Call {
        keys: vec![INSTANCES_KEY.into()],
        args: vec![ttl.as_millis().to_string(), user.unwrap_or_default().to_string()],
    }
}

pub(super) fn leave_call(instance: &str) -> Call {
    Call {
        keys: vec![INSTANCES_KEY.into(), figures_key(instance), users_key(instance)],
        args: vec![instance.to_string()],
    }
}

/// The read script's flat reply as one entry per instance.
pub(super) fn parse_read(reply: Vec<redis::Value>) -> Vec<InstancePresence> {
    reply
        .chunks_exact(4)
        .filter_map(|entry| {
            let text = |v: &redis::Value| redis::from_redis_value_ref::<String>(v).ok();
            Some(InstancePresence {
                instance: text(&entry[0])?,
                figures: text(&entry[1])?,
                connections: decode_connections(&text(&entry[2]).unwrap_or_default()),
                age_ms: redis::from_redis_value_ref::<u64>(&entry[3]).unwrap_or(u64::MAX),
            })
        })
        .collect()
}

/// A user's open connections on one instance as the users hash holds them:
/// `<opened ms>:<id>` joined by commas (at most `SSE_MAX_CLIENTS_PER_USER` of them).
pub(super) fn encode_connections(open: &[OpenConnection]) -> String {
    let mut out = String::with_capacity(open.len() * 24);
    for (i, c) in open.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("{}:{}", c.opened_ms, c.id));
    }
    out
}

/// The reverse of [`encode_connections`]; what does not parse is left out.
pub(super) fn decode_connections(text: &str) -> Vec<OpenConnection> {
    text.split(',')
        .filter_map(|entry| {
            let (opened, id) = entry.split_once(':')?;
            Some(OpenConnection {
                opened_ms: opened.parse().ok()?,
                id: id.parse().ok()?,
            })
        })
        .collect()
}

/// `"!replace <instance> <id>,<id>..."`: asks `instance` to close those connections of
/// the user whose channel carries it.
pub(super) fn replace_message(instance: &str, ids: &[u64]) -> String {
    let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
    format!("!replace {instance} {}", ids.join(","))
}

/// Most ids one replace message may name (more than any per-user limit needs).
const MAX_REPLACED: usize = 64;

/// Parses the part of a replace message after `"!replace "`; `None` when malformed.
pub(super) fn parse_replace(rest: &str) -> Option<(String, Vec<u64>)> {
    let (instance, ids) = rest.split_once(' ')?;
    let valid_instance =
        !instance.is_empty() && instance.len() <= 64 && instance.bytes().all(|b| b.is_ascii_alphanumeric());
    let ids: Vec<u64> = ids.split(',').map(str::parse).collect::<Result<_, _>>().ok()?;
    (valid_instance && !ids.is_empty() && ids.len() <= MAX_REPLACED).then(|| (instance.to_string(), ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_round_trip_and_bad_entries_are_left_out() {
        let open = [
            OpenConnection {
                opened_ms: 1_700_000_000_000,
                id: 7,
            },
            OpenConnection {
                opened_ms: 1_700_000_000_500,
                id: 9,
            },
        ];
        assert_eq!(decode_connections(&encode_connections(&open)), open);
        assert_eq!(encode_connections(&[]), "");
        assert!(decode_connections("").is_empty());
        assert_eq!(
            decode_connections("x:1,5:6,7"),
            [OpenConnection { opened_ms: 5, id: 6 }]
        );
    }

    #[test]
    fn replace_messages_parse_back_and_bad_ones_are_refused() {
        let message = replace_message("0123abcd", &[3, 4]);
        let rest = message.strip_prefix("!replace ").unwrap();
        assert_eq!(parse_replace(rest), Some(("0123abcd".into(), vec![3, 4])));
        let too_many = vec!["1"; MAX_REPLACED + 1].join(",");
        for bad in ["", "abc", "abc ", "a-b 1", "abc 1,x", &format!("abc {too_many}")] {
            assert_eq!(parse_replace(bad), None, "{bad}");
        }
    }
}
