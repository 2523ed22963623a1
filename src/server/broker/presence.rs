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

use super::{InstancePresence, PresenceWrite};

/// The instances seen lately: member = instance id, score = when (ms).
pub(super) const INSTANCES_KEY: &str = "sse:{presence}:instances";

fn figures_key(instance: &str) -> String {
    format!("sse:{{presence}}:i:{instance}")
}

fn users_key(instance: &str) -> String {
    format!("sse:{{presence}}:u:{instance}")
}

/// `KEYS`: instances, figures, users. `ARGV`: instance, now, ttl, figures, full (`1`: the
/// pairs are all of this instance's users), then `user, count` pairs (`0` removes).
/// Returns 1 when the users hash existed before this write (a delta on a hash that
/// expired meanwhile, e.g. while Redis was away, asks the instance for a full write).
const WRITE_SCRIPT: &str = r"
local existed = redis.call('EXISTS', KEYS[3])
if ARGV[5] == '1' then redis.call('DEL', KEYS[3]) end
for i = 6, #ARGV, 2 do
  if ARGV[i + 1] == '0' then
    redis.call('HDEL', KEYS[3], ARGV[i])
  else
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  end
end
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]))
return existed
";

/// `KEYS`: instances. `ARGV`: now, ttl, user (empty: none). Returns `instance, figures,
/// count` for each live instance.
const READ_SCRIPT: &str = r"
local live = redis.call('ZRANGEBYSCORE', KEYS[1], tonumber(ARGV[1]) - tonumber(ARGV[2]), '+inf')
local out = {}
for _, instance in ipairs(live) do
  local figures = redis.call('GET', 'sse:{presence}:i:' .. instance)
  if figures then
    local count = 0
    if ARGV[3] ~= '' then
      count = tonumber(redis.call('HGET', 'sse:{presence}:u:' .. instance, ARGV[3]) or '0')
    end
    table.insert(out, instance)
    table.insert(out, figures)
    table.insert(out, count)
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
            write: Script::new(WRITE_SCRIPT),
            read: Script::new(READ_SCRIPT),
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

pub(super) fn write_call(write: &PresenceWrite<'_>, now_ms: u64) -> Call {
    let mut args = Vec::with_capacity(5 + 2 * write.counts.len());
    args.extend([
        write.instance.to_string(),
        now_ms.to_string(),
        write.ttl.as_millis().to_string(),
        write.figures.to_string(),
        if write.full { "1" } else { "0" }.to_string(),
    ]);
    for (user, count) in write.counts {
        args.push(user.to_string());
        args.push(count.to_string());
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

pub(super) fn read_call(user: Option<&str>, ttl: std::time::Duration, now_ms: u64) -> Call {
    Call {
        keys: vec![INSTANCES_KEY.into()],
        args: vec![
            now_ms.to_string(),
            ttl.as_millis().to_string(),
            user.unwrap_or_default().to_string(),
        ],
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
        .chunks_exact(3)
        .filter_map(|entry| {
            let text = |v: &redis::Value| redis::from_redis_value_ref::<String>(v).ok();
            Some(InstancePresence {
                instance: text(&entry[0])?,
                figures: text(&entry[1])?,
                connections: redis::from_redis_value_ref::<u64>(&entry[2]).unwrap_or(0),
            })
        })
        .collect()
}
