"""The job record: the one place that owns a job's state.

A job record is a Redis hash written before the Celery message is published, so an
id that was never submitted (no record) is told apart from a queued one. Workers move
it through its states with Lua scripts, so every transition is atomic, appends one
event to the job's history list and publishes it for live followers (SSE, webhooks)
in a single round trip. The first final state wins; progress never goes backwards.
Its keys are named in core/keys.py. Every key of a job that ended expires with its
retention (``retention_seconds``); the index entry goes once its record has
(``prune_index``); the files a job leaves behind are queued for deletion by the same
script that ends it (services/retention.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import redis
from kombu.utils import json as kombu_json

from morag.core.keys import RedisKeys
from morag.core.principals import ANONYMOUS_NAME
from morag.core.redis_scripts import DirectScript, lua_string

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from morag.core.config import Settings

HISTORY_MAX = 1000  # events kept per job; older ones are trimmed

#: Upper bounds (seconds) of the job histograms the scripts count into the metrics hash
#: (queue wait, run time, time per stage); services/metrics.py exposes them.
JOB_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


class TaskStatus(StrEnum):
    """A job's state. Values are the lower-case names Celery uses."""

    PENDING = "pending"
    STARTED = "started"
    PROGRESS = "progress"
    SUCCESS = "success"
    FAILURE = "failure"
    RETRY = "retry"
    REVOKED = "revoked"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.REVOKED})
_STATES = {s: s.value.encode() for s in TaskStatus}  # as script arguments, encoded once
RUNNING_STATES = frozenset({TaskStatus.STARTED, TaskStatus.PROGRESS})


def utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(ts: datetime) -> str:
    return ts.isoformat()


def _parse_ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass
class TaskInfo:
    """A job as its record tells it."""

    task_id: str
    status: TaskStatus
    kind: str = ""
    queue: str = ""
    progress: float = 0.0
    stage: str = ""
    message: str = ""
    attempts: int = 0
    error: str | None = None
    error_type: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    cancel_requested: bool = False
    worker: str | None = None
    result: dict[str, Any] | None = None  # the result summary; the full result is separate
    metadata: dict[str, Any] = field(default_factory=dict)
    input: dict[str, Any] = field(default_factory=dict)
    batch_id: str | None = None
    webhook_url: str | None = None
    retry_of: str | None = None
    retry_at: datetime | None = None
    progress_metadata: dict[str, Any] = field(default_factory=dict)  # of the latest report
    owner: str = ANONYMOUS_NAME  # the key's name that submitted it (core/principals.py)

    @property
    def completed_at(self) -> datetime | None:
        """The seed's name for ``finished_at``."""
        return self.finished_at

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> TaskInfo:
        h = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            task_id=h["id"],
            status=TaskStatus(h["state"]),
            kind=h.get("kind", ""),
            queue=h.get("queue", ""),
            progress=float(h.get("progress") or 0.0),
            stage=h.get("stage", ""),
            message=h.get("message", ""),
            attempts=int(h.get("attempts") or 0),
            error=h.get("error_message") or None,
            error_type=h.get("error_type") or None,
            created_at=_parse_ts(h.get("created_at")),
            started_at=_parse_ts(h.get("started_at")),
            finished_at=_parse_ts(h.get("finished_at")),
            updated_at=_parse_ts(h.get("updated_at")),
            cancel_requested=bool(h.get("cancel_requested_at")),
            worker=h.get("worker") or None,
            result=json.loads(h["result_summary"]) if h.get("result_summary") else None,
            metadata=json.loads(h.get("metadata") or "{}"),
            input=json.loads(h.get("input") or "{}"),
            batch_id=h.get("batch_id") or None,
            webhook_url=h.get("webhook_url") or None,
            retry_of=h.get("retry_of") or None,
            retry_at=_parse_ts(h.get("retry_at")),
            progress_metadata=json.loads(h.get("progress_metadata") or "{}"),
            owner=h.get("owner") or ANONYMOUS_NAME,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "status": self.status.value,
            "kind": self.kind,
            "queue": self.queue,
            "progress": self.progress,
            "stage": self.stage,
            "message": self.message,
            "attempts": self.attempts,
            "error": {"type": self.error_type, "message": self.error} if self.error else None,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
            "cancel_requested": self.cancel_requested,
            "result": self.result,
            "metadata": self.metadata,
            "batch_id": self.batch_id,
            "retry_of": self.retry_of,
            "owner": self.owner,
        }


# Shared Lua: append an event to the history, trim it, publish it.
_EMIT = """
local function event(ts, state, progress, stage, message, attempt, extra)
  local e = {ts=ts, state=state, progress=tonumber(progress), stage=stage,
             message=message, attempt=tonumber(attempt)}
  if extra then for k, v in pairs(extra) do e[k] = v end end
  return cjson.encode(e)
end
-- Events (encoded) appended to the history in one RPUSH, then published one by one.
local function push(history_key, channel, ...)
  if redis.call('RPUSH', history_key, ...) > HISTORY_MAX then
    redis.call('LTRIM', history_key, -HISTORY_MAX, -1)
  end
  for i = 1, select('#', ...) do redis.call('PUBLISH', channel, (select(i, ...))) end
end
local function emit(history_key, channel, ts, state, progress, stage, message, attempt, extra)
  push(history_key, channel, event(ts, state, progress, stage, message, attempt, extra))
end
-- A progress report's metadata (JSON, '' for none): kept in the record as the latest, and
-- in the report's event.
local function report_metadata(job_key, metadata_json)
  if not metadata_json or metadata_json == '' then return nil end
  redis.call('HSET', job_key, 'progress_metadata', metadata_json)
  return {metadata=cjson.decode(metadata_json)}
end
local function is_final(state)
  return state == 'success' or state == 'failure' or state == 'revoked'
end
-- Metrics (services/metrics.py reads them at scrape time): counters and histograms live in
-- one hash, counted by the same atomic write that makes the transition, so every process's
-- work is counted exactly once. Fields: c|<name>, h|<name>|<upper bound>, u|<name> (sum, µs).
local BOUNDS = {BUCKETS}
local function observe(metrics_key, name, seconds)
  seconds = math.max(tonumber(seconds) or 0, 0)  -- two hosts' clocks may disagree a little
  local le = '+Inf'
  for _, bound in ipairs(BOUNDS) do
    if seconds <= bound then le = bound; break end
  end
  redis.call('HINCRBY', metrics_key, 'h|' .. name .. '|' .. le, 1)
  -- the sum in whole microseconds: HINCRBY costs Redis half what HINCRBYFLOAT does
  redis.call('HINCRBY', metrics_key, 'u|' .. name, math.floor(seconds * 1000000 + 0.5))
end
-- The time spent in the stage the record is in, up to now (a running job's).
local function stage_done(metrics_key, kind, stage, since, now)
  if stage and since then
    observe(metrics_key, 'stage|' .. (kind or '') .. '|' .. stage, tonumber(now) - tonumber(since))
  end
end
-- The files a job leaves behind (its owned inputs, a video job's keyframes) become due for
-- deletion, by the time it ended (services/retention.py).
local function files_due(inputs_key, artifacts_key, id, owned_files, kind)
  local has_inputs = owned_files and owned_files ~= '' and owned_files ~= '[]'
  if not has_inputs and kind ~= 'video' then return end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  if has_inputs then
    redis.call('ZADD', inputs_key, now, cjson.encode({task_id=id, files=cjson.decode(owned_files)}))
  end
  if kind == 'video' then redis.call('ZADD', artifacts_key, now, id) end
end
-- What every transition to a final state owes, in the same atomic write, so a process dying
-- right after it loses nothing: the record and its history expire with the retention, the
-- webhook is queued (services/webhooks.py), the job's files become due for deletion.
-- The job is counted as finished, and its run time (first start to end) observed.
-- ``known``: the record's id, webhook_url, owned_files, kind, started_ts when the caller
-- read them already (nil: read here).
local ENDED_FIELDS = {'id', 'webhook_url', 'owned_files', 'kind', 'started_ts'}
local function ended(job_key, history_key, retention, outbox_key, inputs_key, artifacts_key,
                     state, ts, metrics_key, now, known)
  redis.call('EXPIRE', job_key, retention)
  redis.call('EXPIRE', history_key, retention)
  local h = known or redis.call('HMGET', job_key, unpack(ENDED_FIELDS))
  if h[2] and h[2] ~= '' then
    redis.call('RPUSH', outbox_key, cjson.encode({task_id=h[1], state=state, ts=ts}))
  end
  files_due(inputs_key, artifacts_key, h[1], h[3], h[4])
  local kind = h[4] or ''
  redis.call('HINCRBY', metrics_key, 'c|finished|' .. kind .. '|' .. state, 1)
  if h[5] then
    observe(metrics_key, 'run|' .. kind .. '|' .. state, tonumber(now) - tonumber(h[5]))
  end
end
""".replace("HISTORY_MAX", str(HISTORY_MAX)).replace(
    "{BUCKETS}", "{" + ", ".join(str(b) for b in JOB_SECONDS_BUCKETS) + "}"
)

# ARGV: id, ts, score, dedupe key ('' for none), dedupe mode (join or take_over), dedupe
#       TTL, owner, kind, then field/value pairs (the other keys are the store's:
#       ``_store_constants``)
# With a dedupe key (the content of a submission), identical work that is still active
# (queued, running or waiting to retry, not being cancelled) is answered instead: its id,
# and nothing is written. Otherwise the key names this job, in the same atomic write.
_CREATE = """
local JOB = job_key(ARGV[1])
if redis.call('EXISTS', JOB) == 1 then return 0 end
local DEDUPE = ARGV[4]
if DEDUPE ~= '' then
  local current = redis.call('GET', DEDUPE)
  if current and ARGV[5] == 'join' then
    local h = redis.call('HMGET', job_key(current), 'state', 'cancel_requested_at')
    local state = h[1]
    if (state == 'pending' or state == 'started' or state == 'progress' or state == 'retry')
       and not h[2] then
      return current
    end
  end
  redis.call('SET', DEDUPE, ARGV[1], 'EX', ARGV[6])
end
redis.call('HSET', JOB, 'id', ARGV[1], 'owner', ARGV[7], 'state', 'pending',
           'progress', '0', 'stage', 'queued', 'message', 'waiting for a worker',
           'attempts', '0', 'created_at', ARGV[2], 'created_ts', ARGV[3], 'updated_at', ARGV[2],
           unpack(ARGV, 9))
redis.call('ZADD', JOB_INDEX, ARGV[3], ARGV[1])
redis.call('ZADD', owner_jobs_key(ARGV[7]), ARGV[3], ARGV[1])
redis.call('SADD', OWNERS, ARGV[7])
redis.call('HINCRBY', METRICS, 'c|submitted|' .. ARGV[8] .. '|' .. ARGV[7], 1)
emit(history_key(ARGV[1]), channel_key(ARGV[1]), ARGV[2], 'pending', 0, 'queued',
     'waiting for a worker', 0, nil)
return 1
"""

# ARGV: as _CREATE's, then a list's key and a task message: the message is pushed onto
#       the list after the record is written, in the same atomic call, unless identical
#       work is active (the answer is its id: nothing is sent). A record that exists
#       already (a retry's) is no reason not to send.
_CREATE_AND_PUSH = (
    """
local MESSAGE = table.remove(ARGV)
local LIST = table.remove(ARGV)
local function create()
"""
    + _CREATE
    + """
end
local answer = create()
if answer == 0 or answer == 1 then redis.call('LPUSH', LIST, MESSAGE) end
return answer
"""
)

# ARGV: id, ts, now (epoch s), worker, lease_ms, max_attempts, kind, queue (the keys are
#       the store's: ``_store_constants``)
# The first start observes the job's queue wait (since its creation: ``created_ts``, or its
# index score for a record written without it).
# Returns {outcome, detail}: ok | final | cancelled | busy | exhausted
_START = """
local JOB, HISTORY, LEASE, CHANNEL = job_key(ARGV[1]), history_key(ARGV[1]),
  lease_key(ARGV[1]), channel_key(ARGV[1])
local h = redis.call('HMGET', JOB, 'state', 'progress', 'attempts', 'cancel_requested_at',
                    'started_at', 'kind', 'started_ts', 'created_ts')
if not h[1] then
  -- a message published without a record (a raw Celery client): adopt it
  redis.call('HSET', JOB, 'id', ARGV[1], 'kind', ARGV[7], 'queue', ARGV[8],
             'state', 'pending', 'progress', '0', 'attempts', '0', 'created_at', ARGV[2])
  h = {'pending', '0', '0', false, false, ARGV[7], false, false}
end
local state, progress, attempts = h[1], h[2] or '0', tonumber(h[3] or '0')
if is_final(state) then return {'final', state} end
if h[4] then
  redis.call('HSET', JOB, 'state', 'revoked', 'stage', 'revoked', 'finished_at', ARGV[2],
             'updated_at', ARGV[2], 'message', 'cancelled before it started')
  emit(HISTORY, CHANNEL, ARGV[2], 'revoked', progress, 'revoked', 'cancelled before it started',
       attempts, nil)
  ended(JOB, HISTORY, RETENTION, OUTBOX, INPUTS_DUE, ARTIFACTS_DUE, 'revoked', ARGV[2], METRICS,
        ARGV[3])
  return {'cancelled', 'revoked'}
end
-- the lease, taken if nobody holds it (one call on the usual path)
if not redis.call('SET', LEASE, ARGV[4], 'NX', 'PX', ARGV[5]) then
  return {'busy', redis.call('GET', LEASE) or ''}
end
if attempts >= tonumber(ARGV[6]) then
  redis.call('DEL', LEASE)
  local msg = 'gave up after ' .. attempts .. ' attempts: the job never finished ' ..
              '(its worker process died or was killed each time)'
  redis.call('HSET', JOB, 'state', 'failure', 'stage', 'failure', 'finished_at', ARGV[2],
             'updated_at', ARGV[2], 'error_type', 'AttemptsExhausted', 'error_message', msg,
             'message', msg)
  emit(HISTORY, CHANNEL, ARGV[2], 'failure', progress, 'failure', msg, attempts, nil)
  ended(JOB, HISTORY, RETENTION, OUTBOX, INPUTS_DUE, ARTIFACTS_DUE, 'failure', ARGV[2], METRICS,
        ARGV[3])
  redis.call('HINCRBY', METRICS, 'c|recovery|gave_up', 1)
  return {'exhausted', tostring(attempts)}
end
if state == 'started' or state == 'progress' then
  -- its last run never ended (the process died): the message was delivered again
  redis.call('HINCRBY', METRICS, 'c|recovery|redelivered', 1)
end
attempts = attempts + 1
local message = 'started (attempt ' .. attempts .. ')'
redis.call('HSET', JOB, 'state', 'started', 'stage', 'started', 'message', message,
           'attempts', attempts, 'worker', ARGV[4], 'updated_at', ARGV[2],
           'started_at', h[5] or ARGV[2], 'started_ts', h[7] or ARGV[3], 'stage_ts', ARGV[3])
if not h[5] then
  local created = h[8] or redis.call('ZSCORE', JOB_INDEX, ARGV[1])
  if created then
    observe(METRICS, 'wait|' .. (h[6] or ARGV[7]), tonumber(ARGV[3]) - tonumber(created))
  end
end
emit(HISTORY, CHANNEL, ARGV[2], 'started', progress, 'started', message, attempts,
     {worker=ARGV[4]})
return {'ok', tostring(attempts)}
"""


def _store_constants(keys: RedisKeys, retention_seconds: int) -> str:
    """Lua defining one store's key names (as core/keys.py makes them) and retention.

    The per-job scripts (create, start, finish) run on every job; with their keys and
    constants written into their text, the client sends a job's id and what changes per
    call, not up to nine key names: each argument is packed by the client, and Redis
    turns each into a Lua string on every call.
    """
    mark = "\x00"
    lines = []
    for name in ("job", "history", "lease", "result", "channel", "owner_jobs"):
        before, after = getattr(keys, name)(mark).split(mark)
        tail = f" .. {lua_string(after)}" if after else ""
        lines.append(f"local function {name}_key(id) return {lua_string(before)} .. id{tail} end")
    for name, key in (
        ("OUTBOX", keys.webhook_outbox),
        ("INPUTS_DUE", keys.inputs_due),
        ("ARTIFACTS_DUE", keys.artifacts_due),
        ("METRICS", keys.metrics),
        ("JOB_INDEX", keys.job_index),
        ("OWNERS", keys.owners),
    ):
        lines.append(f"local {name} = {lua_string(key)}")
    lines.append(f"local RETENTION = {int(retention_seconds)}")
    return "\n".join(lines) + "\n"


# KEYS: job, history, lease, channel, metrics | ARGV: ts, progress, stage, message, worker,
#       lease_ms, metadata_json ('' for none), ts as epoch s
# Returns: ok | cancel | stop:<state>
_PROGRESS = (
    _EMIT
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'cancel_requested_at', 'progress', 'attempts',
                     'stage', 'stage_ts', 'kind')
local state = h[1]
if state ~= 'started' and state ~= 'progress' then return 'stop:' .. tostring(state) end
if h[2] then return 'cancel' end
local progress = math.max(tonumber(h[3] or '0'), tonumber(ARGV[2]))
if h[5] ~= ARGV[3] then
  stage_done(KEYS[5], h[7], h[5], h[6], ARGV[8])
  redis.call('HSET', KEYS[1], 'stage_ts', ARGV[8])
end
redis.call('HSET', KEYS[1], 'state', 'progress', 'progress', progress, 'stage', ARGV[3],
           'message', ARGV[4], 'updated_at', ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[5] then redis.call('PEXPIRE', KEYS[3], ARGV[6]) end
emit(KEYS[2], KEYS[4], ARGV[1], 'progress', progress, ARGV[3], ARGV[4], h[4],
     report_metadata(KEYS[1], ARGV[7]))
return 'ok'
"""
)

# ARGV: id, ts, now (epoch s), worker, state, message, then the state's details (success:
#       summary_json, result_json; failure: error_type, error_message; revoked: '', ''), then
#       optionally the last progress report not yet written: its ts, progress, stage,
#       message, metadata_json, ts as epoch s (the keys are the store's: ``_store_constants``)
# Returns {outcome, state}: ok | final | missing
_FINISH = """
local JOB, HISTORY, LEASE, CHANNEL = job_key(ARGV[1]), history_key(ARGV[1]),
  lease_key(ARGV[1]), channel_key(ARGV[1])
local h = redis.call('HMGET', JOB, 'state', 'cancel_requested_at', 'progress', 'attempts',
                     'stage', 'stage_ts', 'kind', 'worker', 'id', 'webhook_url', 'owned_files',
                     'started_ts')
local current = h[1]
if not current then return {'missing', ''} end
if is_final(current) then return {'final', current} end
local state, message = ARGV[5], ARGV[6]
if state == 'success' and h[2] then
  -- cancelled while finishing: the user asked for no result, so none is kept
  state, message = 'revoked', 'cancelled while running'
end
local fields = {'state', state, 'stage', state, 'message', message, 'finished_at', ARGV[2],
                'updated_at', ARGV[2]}
local function add(name, value)
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
local events = {}
local progress = h[3] or '0'
local running = current == 'started' or current == 'progress'
if ARGV[9] and running then
  -- the report the job made just before finishing, in its place in the history
  progress = math.max(tonumber(progress), tonumber(ARGV[10]))
  local extra = nil
  if ARGV[13] ~= '' then
    add('progress_metadata', ARGV[13])
    extra = {metadata=cjson.decode(ARGV[13])}
  end
  events[1] = event(ARGV[9], 'progress', progress, ARGV[11], ARGV[12], h[4], extra)
  if h[5] ~= ARGV[11] then
    stage_done(METRICS, h[7], h[5], h[6], ARGV[14])
    h[5], h[6] = ARGV[11], ARGV[14]
  end
end
if running then stage_done(METRICS, h[7], h[5], h[6], ARGV[3]) end
if state == 'success' then
  progress = '1'
  add('result_summary', ARGV[7])
  redis.call('SET', result_key(ARGV[1]), ARGV[8], 'EX', RETENTION)
elseif state == 'failure' then
  add('error_type', ARGV[7])
  add('error_message', ARGV[8])
end
add('progress', progress)
redis.call('HSET', JOB, unpack(fields))
-- the lease is this process's while the record names it as the runner (a later claim by
-- another process renames the runner; only this process takes its own lease back)
if ARGV[4] ~= '' and h[8] == ARGV[4] then redis.call('DEL', LEASE) end
events[#events + 1] = event(ARGV[2], state, progress, state, message, h[4], nil)
push(HISTORY, CHANNEL, unpack(events))
ended(JOB, HISTORY, RETENTION, OUTBOX, INPUTS_DUE, ARTIFACTS_DUE, state, ARGV[2], METRICS,
      ARGV[3], {h[9], h[10], h[11], h[7], h[12]})
return {'ok', state}
"""


# KEYS: job, history, lease, channel | ARGV: ts, message, error_type, error_message, worker,
#       retry_at
_RETRY = (
    _EMIT
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or is_final(state) then return 0 end
redis.call('HSET', KEYS[1], 'state', 'retry', 'stage', 'retry', 'message', ARGV[2],
           'error_type', ARGV[3], 'error_message', ARGV[4], 'retry_at', ARGV[6],
           'updated_at', ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[5] then redis.call('DEL', KEYS[3]) end
emit(KEYS[2], KEYS[4], ARGV[1], 'retry', redis.call('HGET', KEYS[1], 'progress'), 'retry',
     ARGV[2], redis.call('HGET', KEYS[1], 'attempts'), {retry_at=ARGV[6]})
return 1
"""
)

# KEYS: job, history, channel, outbox, inputs due, artifacts due, metrics | ARGV: ts,
#       retention_s, now (epoch s)
# Returns {outcome, state}: missing | final | revoked (was queued) | cancelling (is running)
_CANCEL = (
    _EMIT
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', ''} end
local state = redis.call('HGET', KEYS[1], 'state')
if is_final(state) then return {'final', state} end
redis.call('HSET', KEYS[1], 'cancel_requested_at', ARGV[1], 'updated_at', ARGV[1])
local progress = redis.call('HGET', KEYS[1], 'progress')
local attempts = redis.call('HGET', KEYS[1], 'attempts')
if state == 'pending' or state == 'retry' then
  redis.call('HSET', KEYS[1], 'state', 'revoked', 'stage', 'revoked', 'finished_at', ARGV[1],
             'message', 'cancelled before it started')
  emit(KEYS[2], KEYS[3], ARGV[1], 'revoked', progress, 'revoked',
       'cancelled before it started', attempts, nil)
  ended(KEYS[1], KEYS[2], ARGV[2], KEYS[4], KEYS[5], KEYS[6], 'revoked', ARGV[1], KEYS[7],
        ARGV[3])
  return {'revoked', 'revoked'}
end
emit(KEYS[2], KEYS[3], ARGV[1], state, progress, 'cancelling', 'cancellation requested',
     attempts, nil)
return {'cancelling', state}
"""
)

# KEYS: job, history, channel | ARGV: ts, stage, message, extra_json
# An event that is no state change (a webhook delivery attempt): the record is untouched.
_EVENT = (
    _EMIT
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local h = redis.call('HMGET', KEYS[1], 'state', 'progress', 'attempts')
emit(KEYS[2], KEYS[3], ARGV[1], h[1], h[2] or '0', ARGV[2], ARGV[3], h[3] or '0',
     cjson.decode(ARGV[4]))
return 1
"""
)


# KEYS: lease, job | ARGV: worker, lease_ms
# Extends this process's lease; takes it again when it lapsed while Redis was away (its TTL
# ran out meanwhile), as long as the record still names this process as the job's runner.
# Returns held | retaken | other | gone.
_KEEP_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 'held'
end
if holder then return 'other' end
local state = redis.call('HGET', KEYS[2], 'state')
if (state == 'started' or state == 'progress')
   and redis.call('HGET', KEYS[2], 'worker') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'retaken'
end
return 'gone'
"""

# KEYS: job, inputs due, artifacts due | ARGV: path
# Names a file the job made for itself (a downloaded URL) as the job's own, so it is
# deleted with the job's other inputs; already due when the job has ended meanwhile.
_OWN_FILE = (
    _EMIT
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'owned_files', 'id', 'kind')
if not h[1] then return 'missing' end
local files = {}
if h[2] and h[2] ~= '' then files = cjson.decode(h[2]) end
for _, path in ipairs(files) do
  if path == ARGV[1] then return 'ok' end
end
files[#files + 1] = ARGV[1]
local owned = cjson.encode(files)
redis.call('HSET', KEYS[1], 'owned_files', owned)
if is_final(h[1]) then
  files_due(KEYS[2], KEYS[3], h[3], owned, h[4])
  return 'final'
end
return 'ok'
"""
)

# KEYS: index, owners | ARGV: cutoff (epoch s), job key prefix, batch size, offset, owner
#       ('' for the index of all jobs)
# Of the index entries created before the cutoff (only these can have expired), removes
# those whose record is gone; a job still queued or running keeps its entry. An owner
# whose index emptied leaves the owners set (in the same write as a new job would join it).
# Returns {removed, examined}.
_PRUNE_INDEX = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', ARGV[4], ARGV[3])
local gone = {}
for _, id in ipairs(ids) do
  if redis.call('EXISTS', ARGV[2] .. id) == 0 then gone[#gone + 1] = id end
end
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
if ARGV[5] ~= '' and redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[5])
end
return {#gone, #ids}
"""
#: Index entries looked at per script call while pruning (one short Redis call each).
PRUNE_BATCH = 500


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Outcome:
    """What a transition script answered: an outcome word and a detail (state, holder…)."""

    outcome: str
    detail: str = ""


@dataclass(frozen=True)
class ProgressReport:
    """A running job's progress report, as ``JobStore.progress`` writes it."""

    progress: float
    stage: str
    message: str
    at: datetime
    metadata: dict[str, Any] | None = None  # the seed's ``update_progress(..., **metadata)``


class JobStore:
    """Reads and writes job records. One instance per process and settings."""

    def __init__(self, client: redis.Redis, prefix: str, retention_seconds: int) -> None:
        self.redis = client
        self.keys = RedisKeys(prefix)
        self.retention_seconds = retention_seconds
        constants = _store_constants(self.keys, retention_seconds)
        self._create = DirectScript(constants + _EMIT + _CREATE)
        self._create_and_push = DirectScript(constants + _EMIT + _CREATE_AND_PUSH)
        self._start = DirectScript(constants + _EMIT + _START)
        self._progress = client.register_script(_PROGRESS)
        self._finish = DirectScript(constants + _EMIT + _FINISH)
        self._retry = client.register_script(_RETRY)
        self._cancel = client.register_script(_CANCEL)
        self._keep_lease = client.register_script(_KEEP_LEASE)
        self._event = client.register_script(_EVENT)
        self._own_file = client.register_script(_OWN_FILE)
        self._prune_index = client.register_script(_PRUNE_INDEX)

    # -- writes ---------------------------------------------------------------------------
    def create(
        self,
        task_id: str,
        *,
        kind: str,
        queue: str,
        task_name: str,
        input: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        owner: str = ANONYMOUS_NAME,
        extra: dict[str, str] | None = None,
        dedupe_key: str | None = None,
        take_over: bool = False,
        push: tuple[str, str] | None = None,
    ) -> str | None:
        """Write a new pending record of ``owner``'s; the id of the job that does the work,
        or None when a record with this id exists already.

        With ``dedupe_key`` (the key of a submission's content), the id of an active job
        holding that key is answered instead and nothing is written, unless ``take_over``
        (a retry becomes the job doing that work). A new record takes the key for
        ``retention_seconds``, as long as a finished job is kept.

        With ``push`` (a list's key and a task message), the message is pushed onto the
        list after the record, in the same call, unless the answer is another job's id
        (core/broker.py).
        """
        now = utcnow()
        fields: dict[str, str] = {
            "kind": kind,
            "queue": queue,
            "task_name": task_name,
            "input": json.dumps(input or {}),
            "metadata": json.dumps(metadata or {}),
            **(extra or {}),
        }
        script, pushed = (self._create, ()) if push is None else (self._create_and_push, push)
        answer = script(
            self.redis,
            task_id,
            _iso(now),
            now.timestamp(),
            dedupe_key or "",
            "take_over" if take_over else "join",
            self.retention_seconds,
            owner,
            kind,
            *[item for pair in fields.items() for item in pair],
            *pushed,
        )
        if answer == 0:
            return None
        return task_id if answer == 1 else _s(answer)

    def create_submitted(
        self,
        task_id: str,
        *,
        task_name: str,
        kind: str,
        queue: str,
        kwargs: dict[str, Any],
        args: Any = (),
        owner: str = ANONYMOUS_NAME,
        extra: dict[str, str] | None = None,
        dedupe_key: str | None = None,
        take_over: bool = False,
        push: tuple[str, str] | None = None,
    ) -> str | None:
        """``create`` for a task message about to be published: the record keeps what the
        message carries (``submission``, in kombu's JSON, the message's own types), so a
        job whose message the broker lost can be queued again (services/recovery.py), and
        a failed one retried."""
        inputs = {k: v for k, v in kwargs.items() if k in ("file_path", "url", "source_type")}
        submission = kombu_json.dumps({"task": task_name, "args": list(args), "kwargs": kwargs})
        return self.create(
            task_id,
            kind=kind,
            queue=queue,
            task_name=task_name,
            input=inputs or {"args": list(args)},
            metadata=kwargs.get("metadata") or {},
            owner=owner,
            extra={"submission": submission, **(extra or {})},
            dedupe_key=dedupe_key,
            take_over=take_over,
            push=push,
        )

    def start(
        self,
        task_id: str,
        *,
        worker: str,
        lease_seconds: float,
        max_attempts: int,
        kind: str = "",
        queue: str = "",
    ) -> Outcome:
        """Claim the job for one run: ok, or why it must not run (final, cancelled, busy…)."""
        now = utcnow()
        outcome, detail = self._start(
            self.redis,
            task_id,
            _iso(now),
            now.timestamp(),
            worker,
            int(lease_seconds * 1000),
            max_attempts,
            kind,
            queue,
        )
        return Outcome(_s(outcome), _s(detail))

    def progress(
        self,
        task_id: str,
        progress: float,
        stage: str,
        message: str,
        *,
        worker: str,
        lease_seconds: float,
        at: datetime | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Record progress (made at ``at``, default now) with the report's ``metadata``
        (kept in the record and the event); answers ok, cancel (stop now) or stop:<state>
        (record is final)."""
        at = at or utcnow()
        answer = self._progress(
            keys=[
                self.keys.job(task_id),
                self.keys.history(task_id),
                self.keys.lease(task_id),
                self.keys.channel(task_id),
                self.keys.metrics,
            ],
            args=[
                _iso(at),
                min(max(progress, 0.0), 1.0),
                stage,
                message,
                worker,
                int(lease_seconds * 1000),
                json.dumps(metadata) if metadata else "",
                at.timestamp(),
            ],
        )
        return _s(answer)

    def finish(
        self,
        task_id: str,
        state: TaskStatus,
        *,
        message: str = "",
        worker: str = "",
        error_type: str = "",
        error_message: str = "",
        summary: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        last_report: ProgressReport | None = None,
    ) -> Outcome:
        """Move the job to a final state; the first final state wins. ``last_report``, a
        progress report not written yet, goes into the history first, in the same write."""
        assert state.is_final
        report: list[str | float] = []
        if last_report is not None:
            report = [
                _iso(last_report.at),
                min(max(last_report.progress, 0.0), 1.0),
                last_report.stage,
                last_report.message,
                json.dumps(last_report.metadata) if last_report.metadata else "",
                last_report.at.timestamp(),
            ]
        details: list[str | bytes]
        if state is TaskStatus.SUCCESS:
            details = [json.dumps(summary or {}), json.dumps(result or {})]
        elif state is TaskStatus.FAILURE:
            details = [error_type, error_message]
        else:
            details = [b"", b""]
        now = utcnow()
        outcome, final_state = self._finish(
            self.redis,
            task_id,
            _iso(now),
            now.timestamp(),
            worker,
            _STATES[state],
            message or state.value,
            *details,
            *report,
        )
        return Outcome(_s(outcome), _s(final_state))

    def mark_retry(
        self,
        task_id: str,
        *,
        message: str,
        error_type: str,
        error_message: str,
        worker: str,
        retry_at: datetime,
    ) -> bool:
        return bool(
            self._retry(
                keys=[
                    self.keys.job(task_id),
                    self.keys.history(task_id),
                    self.keys.lease(task_id),
                    self.keys.channel(task_id),
                ],
                args=[_iso(utcnow()), message, error_type, error_message, worker, _iso(retry_at)],
            )
        )

    def request_cancel(self, task_id: str) -> Outcome:
        """Flag the job cancelled: missing | final | revoked (was queued) | cancelling."""
        outcome, state = self._cancel(
            keys=[
                self.keys.job(task_id),
                self.keys.history(task_id),
                self.keys.channel(task_id),
                self.keys.webhook_outbox,
                self.keys.inputs_due,
                self.keys.artifacts_due,
                self.keys.metrics,
            ],
            args=[_iso(now := utcnow()), self.retention_seconds, now.timestamp()],
        )
        return Outcome(_s(outcome), _s(state))

    def append_event(
        self, task_id: str, *, stage: str, message: str, extra: dict[str, Any] | None = None
    ) -> bool:
        """Add an event that changes no state (e.g. a webhook attempt) to the history.

        The event carries the job's current state, progress and attempt; False when the
        record is gone.
        """
        return bool(
            self._event(
                keys=[
                    self.keys.job(task_id),
                    self.keys.history(task_id),
                    self.keys.channel(task_id),
                ],
                args=[_iso(utcnow()), stage, message, json.dumps(extra or {})],
            )
        )

    def own_file(self, task_id: str, path: str) -> str:
        """Record ``path`` (made by the job, e.g. a download) as the job's own input, to be
        deleted with it: ok | final (already due) | missing (no record)."""
        answer = self._own_file(
            keys=[self.keys.job(task_id), self.keys.inputs_due, self.keys.artifacts_due],
            args=[path],
        )
        return _s(answer)

    def keep_lease(self, task_id: str, worker: str, lease_seconds: float) -> str:
        """Keep (or take back) the lease of a job this process runs: held | retaken |
        other | gone. Taking it back matters when a Redis outage outlasted the lease:
        otherwise recovery would hand the still-running job to a second process."""
        answer = self._keep_lease(
            keys=[self.keys.lease(task_id), self.keys.job(task_id)],
            args=[worker, int(lease_seconds * 1000)],
        )
        return _s(answer)

    # -- reads ----------------------------------------------------------------------------
    def owner_of(self, task_id: str) -> str:
        """The owner of a job (the anonymous owner for a record without one)."""
        owner = self.redis.hget(self.keys.job(task_id), "owner")
        return _s(owner) if owner else ANONYMOUS_NAME

    def get(self, task_id: str) -> TaskInfo | None:
        raw: dict[bytes, bytes] = self.redis.hgetall(self.keys.job(task_id))  # type: ignore[assignment]
        return TaskInfo.from_hash(raw) if raw else None

    async def aget(self, client: aioredis.Redis, task_id: str) -> TaskInfo | None:
        """``get`` through an asyncio client: one round trip, no thread for the API."""
        raw: dict[bytes, bytes] = await client.hgetall(self.keys.job(task_id))  # type: ignore[assignment]
        return TaskInfo.from_hash(raw) if raw else None

    def get_many(self, task_ids: Iterable[str]) -> list[TaskInfo | None]:
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hgetall(self.keys.job(task_id))
        return [TaskInfo.from_hash(raw) if raw else None for raw in pipe.execute()]

    def history(self, task_id: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.redis.lrange(self.keys.history(task_id), 0, -1)]

    def result(self, task_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(self.keys.result(task_id))
        return json.loads(raw) if raw else None

    def has_lease(self, task_id: str) -> bool:
        return bool(self.redis.exists(self.keys.lease(task_id)))

    def list_ids(
        self,
        *,
        newest_first: bool = True,
        start: float = 0,
        end: float = 0,
        offset: int = 0,
        count: int = 100,
        owner: str | None = None,
    ) -> list[str]:
        """Ids by creation time, within [start, end] epoch seconds (0: unbounded); only
        ``owner``'s when given."""
        low = start or "-inf"
        high = end or "+inf"
        index = self.keys.owner_jobs(owner) if owner is not None else self.keys.job_index
        if newest_first:
            ids = self.redis.zrevrangebyscore(index, high, low, start=offset, num=count)
        else:
            ids = self.redis.zrangebyscore(index, low, high, start=offset, num=count)
        return [_s(i) for i in ids]  # type: ignore[arg-type]

    def prune_index(self) -> int:
        """Drop the index entries of jobs whose records have expired; the number dropped.

        A record expires ``retention_seconds`` after its job ended, so only entries created
        longer ago than that can have one gone; a job that old still queued or running
        (no expiry yet) keeps its entry.
        """
        cutoff = time.time() - self.retention_seconds
        removed = self._prune(self.keys.job_index, cutoff)
        for owner in self.redis.smembers(self.keys.owners):
            removed += self._prune(self.keys.owner_jobs(_s(owner)), cutoff, owner=_s(owner))
        return removed

    def _prune(self, index: str, cutoff: float, owner: str = "") -> int:
        removed = offset = 0
        while True:
            gone, examined = self._prune_index(
                keys=[index, self.keys.owners],
                args=[cutoff, self.keys.job(""), PRUNE_BATCH, offset, owner],
            )
            removed += int(gone)
            offset += int(examined) - int(gone)  # the kept entries are skipped next time
            if int(examined) < PRUNE_BATCH:
                return removed


_stores: dict[tuple[str, str], JobStore] = {}


def get_job_store(cfg: Settings) -> JobStore:
    """The job store for these settings, shared in this process (the worker's tasks and
    signal handlers pass the worker's settings)."""
    from morag.core.redis_conn import get_redis

    key = (cfg.redis_url, cfg.key_prefix)
    store = _stores.get(key)
    if store is None:
        store = JobStore(get_redis(cfg.redis_url), cfg.key_prefix, cfg.result_retention_seconds)
        _stores[key] = store
    return store


def reset_job_stores() -> None:
    """Forget stores and their clients (in a freshly forked process)."""
    from morag.core.redis_conn import reset_clients

    _stores.clear()
    reset_clients()
