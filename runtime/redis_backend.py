"""The Redis side of replication: the keys of a session, the Lua scripts that change them
atomically, and `RedisBackend`, which runs them (runtime/replication.py is the policy that
decides when).

    replica A ─┐            {prefix}:s:{id}   hash  snap (signed snapshot bytes: model sha,
    replica B ─┼─ Redis ──►                         S, position, state; runtime/snapshots.py),
    replica C ─┘                                    principal, ttl, version, incarnation, term,
                                                    holder, raised
                            {prefix}:l:{id}   string  the replica id holding the lease (PX)
                            {prefix}:x:{id}:{incarnation}   "closed" | "evicted" (a tombstone)
                            {prefix}:snapshot-key   the key every replica signs with
                            {prefix}:generation     a random token: this Redis's data set

Each script names its KEYS and ARGV and what it answers in the comment above it. Redis runs
a script atomically, so a compare-and-set of a record and its lease is one step; leases
use Redis's clock (PX), so replica clocks need not agree.
"""

from __future__ import annotations

import logging
import urllib.parse
import uuid
from collections.abc import Sequence

from .errors import ModelError

log = logging.getLogger(__name__)

# KEYS lease, session; ARGV owner, ttl ms. 1 when the id was free and its lease is now ours
# (taken here: no one held it and no record exists), else 0 (nothing changed).
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('DEL', KEYS[1])
    return 0
  end
  return 1
end
return 0
"""
# KEYS lease, session per id; ARGV owner, ttl ms, then each session's record expire ms (0:
# none). Per id 1 (renewed; the record's expiry too, as a write would) or 0 (not ours any more).
_RENEW = """
local out = {}
for i = 1, #KEYS / 2 do
  if redis.call('GET', KEYS[2 * i - 1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[2 * i - 1], ARGV[2])
    if tonumber(ARGV[2 + i]) > 0 then redis.call('PEXPIRE', KEYS[2 * i], ARGV[2 + i]) end
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
# KEYS leases; ARGV owner. Deletes the ones we hold.
_RELEASE = """
for _, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then redis.call('DEL', k) end
end
return 0
"""
# KEYS session, lease, generation; ARGV owner, expected version, snap, principal, ttl, expire ms
# (0: none), incarnation, generation token, term, lease ms. A lease no one holds over a record
# that is exactly our copy (incarnation, term, version, us its holder: our lease lapsed, or
# older data lack it, and no one took the session over since) is taken back; so is the lease of
# a new session's first write (version 0, no record) that no one holds (its claim lapsed), and
# a first write's lease runs from that write.
# The new version, or -1 (lease not ours) / -2 (version or term moved on: we are stale) / -3
# (the generation token is not ours: Redis lost its data, or another replica saw that first) /
# -6 (the record we build on is gone: it expired, or Redis evicted it; or it is a stale copy of
# a lower term under no one else's lease; a write-back is due) /
# -7 (it went back to fewer of our own writes, with no other holder since: Redis came back from
# an older dump or a lagging replica; its term went up by one, as at a take-over, so that a copy
# from a take-over the older data lack ties with ours and loses on the holder, and `raised`
# names us until the next write; a write-back of ours at that term is due).
_PUT = """
if redis.call('GET', KEYS[3]) ~= ARGV[8] then return -3 end
local cur = redis.call('GET', KEYS[2])
local h = redis.call('HMGET', KEYS[1], 'version', 'term', 'holder', 'incarnation')
-- a record of our incarnation and term that we wrote last, under no one else's lease
if h[1] ~= false and tonumber(h[2] or '-1') == tonumber(ARGV[9]) and h[3] == ARGV[1]
   and h[4] == ARGV[7] and (cur == false or cur == ARGV[1]) then
  if tonumber(h[1]) < tonumber(ARGV[2]) then  -- fewer of our writes: older data
    redis.call('HSET', KEYS[1], 'term', tonumber(ARGV[9]) + 1, 'raised', ARGV[1])
    return -7
  end
  -- our lease lapsed (or older data lack it), no one took over, the record is our copy
  if cur == false and tonumber(h[1]) == tonumber(ARGV[2]) then
    redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[10])
    cur = ARGV[1]
  end
end
-- a record of our incarnation and a lower term, under no one else's lease: a stale copy
-- (written back after the record vanished, or older data that lack our take-over); ours wins
if h[1] ~= false and h[4] == ARGV[7] and tonumber(h[2] or '0') < tonumber(ARGV[9])
   and (cur == false or cur == ARGV[1]) then return -6 end
-- a new session's first write (version 0, no record yet) under no one else's lease: the lease
-- is taken (again) from now, as the claim took it: a claim that lapsed before this write (a
-- slow reply, the wait for a write in flight) is not lost while no one else claimed the id
if h[1] == false and tonumber(ARGV[2]) == 0 and (cur == false or cur == ARGV[1]) then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[10])
  cur = ARGV[1]
end
if cur ~= ARGV[1] then return -1 end
if h[1] == false and tonumber(ARGV[2]) > 0 then return -6 end
local v = tonumber(h[1] or '0')
if v ~= tonumber(ARGV[2]) or tonumber(h[2] or ARGV[9]) ~= tonumber(ARGV[9]) then return -2 end
redis.call('HSET', KEYS[1], 'snap', ARGV[3], 'principal', ARGV[4], 'ttl', ARGV[5],
           'version', v + 1, 'incarnation', ARGV[7], 'term', ARGV[9], 'holder', ARGV[1],
           'raised', '')
if tonumber(ARGV[6]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[6])
else redis.call('PERSIST', KEYS[1]) end
return v + 1
"""
# KEYS session, lease, generation, tombstone; ARGV owner, our copy's version, snap, principal,
# ttl, expire ms (0: none), incarnation, generation token, lease ms, our copy's term.
# A write-back (after an outage, an empty restart, or an expired record): our copy becomes the
# record and the lease ours, unless that incarnation ended (-4 closed, -5 evicted), or the
# record is another incarnation's, of a later term, or of our term but another holder's, or
# there is no record but another replica holds the lease (it serves the session now) (-2: ours
# is stale). Terms go up only at a take-over, so the copy of the last holder has the highest
# term, however often a stale copy was written back and stepped since; a record of our term and
# holder (or none) is our own earlier write, and one of the next term naming us as holder and
# as `raised` is our own term raise whose reply was lost (_PUT's -7, _TAKE's {5, term}; not a
# take-over, which clears `raised`): we take that term on.
# {the new version, the term written}, or -3: generation.
_RESTORE = """
if redis.call('GET', KEYS[3]) ~= ARGV[8] then return -3 end
local t = redis.call('GET', KEYS[4])
if t then
  if t == 'evicted' then return -5 end
  return -4
end
local h = redis.call('HMGET', KEYS[1], 'version', 'incarnation', 'term', 'holder', 'raised')
local v, term = tonumber(ARGV[2]), tonumber(ARGV[10])
if h[1] == false then
  local cur = redis.call('GET', KEYS[2])
  if cur and cur ~= ARGV[1] then return -2 end
else
  if h[2] ~= false and h[2] ~= ARGV[7] then return -2 end
  local had = tonumber(h[3] or '0')
  if had == term + 1 and h[4] == ARGV[1] and h[5] == ARGV[1] then term = had end
  if had > term or (had == term and h[4] ~= false and h[4] ~= ARGV[1]) then return -2 end
  v = math.max(v, tonumber(h[1]))
end
v = v + 1
redis.call('HSET', KEYS[1], 'snap', ARGV[3], 'principal', ARGV[4], 'ttl', ARGV[5],
           'version', v, 'incarnation', ARGV[7], 'term', term, 'holder', ARGV[1], 'raised', '')
if tonumber(ARGV[6]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[6])
else redis.call('PERSIST', KEYS[1]) end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[9])
return {v, term}
"""
# KEYS session, lease, generation; ARGV owner, generation token, lease ms, principal, and our
# copy's incarnation ('' none), term and version (-1 none). Makes a session ours (`fetch`), in
# one round trip: {-3} generation; {1} no record; {4, incarnation} a record of another
# principal (nothing taken); {0, holder} another replica holds the lease (nothing taken); else
# the lease is ours now and the record's expiry renewed, and then {3} when the record is our
# copy (we held it last: same incarnation, term and version, no other holder), {5} when it is
# of our incarnation but older than our copy: {5} of a lower term (a stale copy written back
# after the record vanished), {5, new term} of our term and holding no other replica's writes
# but fewer of ours (Redis came back from an older dump or a lagging replica: the term goes up
# by one as at a take-over, see _PUT's -7); ours is to be written back; or {2, HGETALL as it
# was} after a take-over: the term went up by one and the holder became us.
_TAKE = """
if redis.call('GET', KEYS[3]) ~= ARGV[2] then return {-3} end
local h = redis.call('HMGET', KEYS[1], 'principal', 'incarnation', 'term', 'version', 'holder')
if h[1] == false then return {1} end
if h[1] ~= ARGV[4] then return {4, h[2] or ''} end
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= ARGV[1] then return {0, cur} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl'))
if ttl == nil or ttl > 1e9 then redis.call('PERSIST', KEYS[1])
else redis.call('PEXPIRE', KEYS[1], math.floor(ttl * 1000) + 60000) end
if (h[2] or '') == ARGV[5] then
  local term = tonumber(h[3] or '0')
  if term < tonumber(ARGV[6]) then return {5} end
  if term == tonumber(ARGV[6]) and (h[5] == false or h[5] == ARGV[1]) then
    if tonumber(h[4]) == tonumber(ARGV[7]) then return {3} end
    if tonumber(h[4]) < tonumber(ARGV[7]) then
      redis.call('HSET', KEYS[1], 'term', term + 1, 'holder', ARGV[1], 'raised', ARGV[1])
      return {5, term + 1}
    end
  end
end
local out = redis.call('HGETALL', KEYS[1])
redis.call('HINCRBY', KEYS[1], 'term', 1)
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'raised', '')
table.insert(out, 1, 2)
return out
"""
# KEYS session, lease; ARGV owner, the term our take-over gave, the term, holder and raised
# before it ('' none). Undoes a take-over whose load failed (another model, a full store): 1,
# or 0 when anything moved on since.
_UNTAKE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local h = redis.call('HMGET', KEYS[1], 'term', 'holder')
if h[1] == false or tonumber(h[1]) ~= tonumber(ARGV[2]) or h[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'term', ARGV[3], 'raised', ARGV[5])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'holder', ARGV[4])
else redis.call('HDEL', KEYS[1], 'holder') end
return 1
"""
# KEYS session, lease, tombstone, generation; ARGV owner, version we know (-1: any), incarnation,
# tombstone expire ms (0: none), reason, term we know (-1: any), generation token. Deletes both
# and leaves the incarnation's tombstone when the record is ours (our version and term, or our
# term and us its holder: our own write whose reply was lost, or the next term naming us as
# holder and `raised`: our own term raise whose reply was lost; nobody else holding the lease) or
# of a lower term than our copy (a stale copy written back after Redis lost its data: the close
# wins over it as our copy would have). 1 deleted, 0 left alone (another incarnation, or a newer
# copy elsewhere), -3 generation.
_DROP = """
if redis.call('GET', KEYS[4]) ~= ARGV[7] then return -3 end
local cur = redis.call('GET', KEYS[2])
local h = redis.call('HMGET', KEYS[1], 'version', 'incarnation', 'term', 'holder', 'raised')
local older = false
if h[1] ~= false then
  if ARGV[3] ~= '' and h[2] ~= false and h[2] ~= ARGV[3] then return 0 end
  local term, ours = tonumber(h[3] or '0'), tonumber(ARGV[6])
  older = ours >= 0 and term < ours
  local mine = ours >= 0 and h[4] == ARGV[1]
    and (term == ours or (term == ours + 1 and h[5] == ARGV[1]))  -- a raise of ours, reply lost
  if not (older or mine) then
    if tonumber(ARGV[2]) >= 0 and tonumber(h[1]) ~= tonumber(ARGV[2]) then return 0 end
    if ours >= 0 and term ~= ours then return 0 end
  end
end
if cur ~= false and cur ~= ARGV[1] and not older then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
if ARGV[3] ~= '' then
  if tonumber(ARGV[4]) > 0 then
    redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[4])
  else
    redis.call('SET', KEYS[3], ARGV[5])
  end
end
return 1
"""

LOST, STALE, RESET, CLOSED, EVICTED, NOREC, BEHIND = -1, -2, -3, -4, -5, -6, -7
# _TAKE's replies
HELD, NO_RECORD, TAKEN, CURRENT, OTHER_PRINCIPAL, OLDER = 0, 1, 2, 3, 4, 5
PIPELINE_CALLS = 256  # script calls per pipelined round trip


class StoreReset(Exception):
    """Redis's generation token is not the one this replica joined: its data were lost
    (restarted empty, flushed) or another replica noticed that first. Handled as an outage
    that just ended (see the module docstring)."""


def record_expire_ms(ttl: float) -> int:
    """How long Redis keeps a session's record (and a closed one's tombstone): its TTL and a
    minute more; past ~1e9 s no expiry (Redis refuses larger expiries)."""
    return 0 if ttl > 1e9 else int(1000 * ttl) + 60_000


def _record(h: dict) -> dict | None:
    """A session record's hash (bytes → bytes) as {snap, principal, ttl, version,
    incarnation, term, holder}; None when there is none."""
    if not h or b"snap" not in h:
        return None
    return {
        "snap": h[b"snap"],
        "principal": h[b"principal"].decode(),
        "ttl": float(h[b"ttl"]),
        "version": int(h[b"version"]),
        "incarnation": h.get(b"incarnation", b"").decode() or None,
        "term": int(h.get(b"term", b"0")),
        "holder": h.get(b"holder", b"").decode() or None,
        "raised": h.get(b"raised", b"").decode() or None,
    }


def without_password(url: str) -> str:
    """The URL with its password (redis://user:PASSWORD@host…, ?password=…) replaced by ***:
    for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
        parts = parts._replace(netloc=netloc)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "password" for k, _ in query):
        hidden = [(k, "***" if k == "password" else v) for k, v in query]
        parts = parts._replace(query=urllib.parse.urlencode(hidden, safe="*"))
    scheme, netloc, path, q, _ = parts  # unsplit by hand: unix:///path keeps its "//"
    return f"{scheme}://{netloc}{path}" + (f"?{q}" if q else "")


class RedisBackend:
    """The Redis side: session records and leases (scripts above). Raises redis errors."""

    def __init__(self, url: str, prefix: str = "ssmstream", timeout: float = 0.5):
        try:
            import redis
        except ImportError as e:  # the `redis` extra
            raise ModelError(
                "--state-store redis://… needs the redis package: pip install 'ssmstream[redis]'"
            ) from e
        self.url, self.prefix = without_password(url), prefix  # self.url goes into logs
        try:
            self.client = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=0
            )
        except ValueError as e:  # a URL the redis client cannot read (a port that is no number)
            raise ValueError(f"state_store: {e} (in {self.url})") from e
        self.Error = (redis.RedisError, StoreReset)
        self.NoScriptError = redis.exceptions.NoScriptError
        self.generation = ""  # the token of the Redis data set we joined (`join`)
        self._generation_key = f"{prefix}:generation"
        self._claim = self.client.register_script(_CLAIM)
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)
        self._put = self.client.register_script(_PUT)
        self._drop = self.client.register_script(_DROP)
        self._take = self.client.register_script(_TAKE)
        self._restore = self.client.register_script(_RESTORE)
        self._untake = self.client.register_script(_UNTAKE)

    def key(self, session_id: str) -> str:
        return f"{self.prefix}:s:{session_id}"

    def lease(self, session_id: str) -> str:
        return f"{self.prefix}:l:{session_id}"

    def ping(self) -> bool:
        return bool(self.client.ping())

    def claim(self, session_id: str, owner: str, ttl_ms: int) -> bool:
        """Reserve a new session's id: True when it was free (its lease is now ours); False,
        changing nothing, when anyone holds its lease or a record of it exists."""
        keys = [self.lease(session_id), self.key(session_id)]
        return bool(self._claim(keys=keys, args=[owner, ttl_ms]))

    def renew(
        self, ids: Sequence[str], owner: str, ttl_ms: int, expire_ms: Sequence[int]
    ) -> list[bool]:
        """Renew our leases of `ids` and their records' expiry (`expire_ms` each, 0: none)."""
        if not ids:
            return []
        keys = [k for i in ids for k in (self.lease(i), self.key(i))]
        ok = self._renew(keys=keys, args=[owner, ttl_ms, *expire_ms])
        return [bool(x) for x in ok]

    def release(self, ids: Sequence[str], owner: str) -> None:
        if ids:
            self._release(keys=[self.lease(i) for i in ids], args=[owner])

    def exists(self, session_id: str) -> bool:
        return bool(self.client.exists(self.key(session_id)))

    def snapshot_key(self, proposed: bytes) -> bytes:
        """The key all replicas sign snapshots with: the first replica's proposal (SET NX),
        proposed again by each replica whose Redis came back empty."""
        name = f"{self.prefix}:snapshot-key"
        self.client.set(name, proposed, nx=True)
        return self.client.get(name)

    def join(self) -> None:
        """Join this Redis's data set: propose a new generation token (SET NX) and keep the
        one Redis holds (the first proposal since the data set began)."""
        self.client.set(self._generation_key, uuid.uuid4().hex, nx=True)
        self.generation = (self.client.get(self._generation_key) or b"").decode()

    def check_generation(self) -> None:
        """Raise StoreReset when Redis's generation token is not the one we joined."""
        now = self.client.get(self._generation_key)
        if now is None or now.decode() != self.generation:
            raise self._reset()

    def _reset(self) -> StoreReset:
        return StoreReset(f"{self.url} holds another data set (restarted empty or flushed)")

    def load(self, session_id: str) -> dict | None:
        """{snap, principal, ttl, version, incarnation, term, holder} or None."""
        return _record(self.client.hgetall(self.key(session_id)))

    def take(
        self,
        session_id: str,
        owner: str,
        lease_ms: int,
        principal: str,
        ours: tuple[str, int, int],
    ) -> tuple[int, object]:
        """`_TAKE` with `ours` = our copy's (incarnation, term, version) (("", -1, -1): none):
        (HELD, the holder) | (NO_RECORD, None) | (OTHER_PRINCIPAL, the record's incarnation)
        | (CURRENT, None) | (OLDER, None, or the term a rolled-back record went up to)
        | (TAKEN, the record as `load` gives it, before its term went up; `untake` undoes
        that). Raises StoreReset when the generation token is
        not ours."""
        keys = [self.key(session_id), self.lease(session_id), self._generation_key]
        args = [owner, self.generation, lease_ms, principal, *ours]
        out = self._take(keys=keys, args=args)
        code = int(out[0])
        if code == RESET:
            raise self._reset()
        if code == TAKEN:
            return code, _record(dict(zip(out[1::2], out[2::2])))
        if code == OLDER:  # a rolled-back record of our term: the term it went up to
            return code, int(out[1]) if len(out) > 1 else None
        if code in (HELD, OTHER_PRINCIPAL):
            return code, out[1].decode() if isinstance(out[1], bytes) else str(out[1])
        return code, None

    def heads(self, ids: Sequence[str]) -> list[tuple[str, int, int | None, str, str]]:
        """Each session's (incarnation, term, version, holder, lease holder) ('' none; the
        version None where there is no record); pipelined, without the snapshots."""
        pipe = self.client.pipeline(transaction=False)
        for sid in ids:
            pipe.hmget(self.key(sid), "incarnation", "term", "version", "holder")
            pipe.get(self.lease(sid))
        out = pipe.execute()
        heads = []
        for (incarnation, term, version, holder), lease in zip(out[::2], out[1::2]):
            text = [(x or b"").decode() for x in (incarnation, holder, lease)]
            version = None if version is None else int(version)
            heads.append((text[0], int(term or 0), version, *text[1:]))
        return heads

    def untake(self, session_id: str, owner: str, rec: dict) -> bool:
        """Undo the take-over that loaded `rec` (its load failed here)."""
        keys = [self.key(session_id), self.lease(session_id)]
        args = [owner, rec["term"] + 1, rec["term"], rec["holder"] or "", rec["raised"] or ""]
        return bool(self._untake(keys=keys, args=args))

    def write_many(
        self, items: Sequence[tuple], owner: str, lease_ms: int
    ) -> list[tuple[int, int]]:
        """items: (session_id, version, term, snap, principal, ttl, incarnation, restore),
        pipelined. Per item (code, the record's term now). A write (`_PUT`, compare-and-set on
        the version and term under our lease) gives the new version or LOST / STALE / NOREC /
        BEHIND (the term went up by one); a write-back (restore: True, `_RESTORE`) the new
        version (and the term: one up where a term raise of ours lost its reply) or STALE /
        CLOSED / EVICTED. Raises StoreReset when the generation token is not ours (the
        token is checked first: such a call wrote nothing).
        """
        calls = []
        for sid, version, term, snap, principal, ttl, incarnation, restore in items:
            args = (owner, version, snap, principal, repr(float(ttl)), record_expire_ms(ttl),
                    incarnation, self.generation)  # fmt: skip
            keys = (self.key(sid), self.lease(sid), self._generation_key)
            if restore:
                calls.append((self._restore, keys + (self.tomb(sid, incarnation),),
                              args + (lease_ms, term)))  # fmt: skip
            else:
                calls.append((self._put, keys, args + (term, lease_ms)))
        out = []
        for item, v in zip(items, self._run(calls)):
            if isinstance(v, list):  # a write-back: {version, term}
                out.append((int(v[0]), int(v[1])))
            else:
                out.append((int(v), item[2] + 1 if int(v) == BEHIND else item[2]))
        if any(code == RESET for code, _ in out):
            raise self._reset()
        return out

    def _run(self, calls: Sequence[tuple]) -> list:
        """Run (script, keys, args) calls pipelined, PIPELINE_CALLS per round trip. A script
        Redis lost (it restarted) is loaded, and only the calls that did not run run again
        (the others applied: running them twice would find them stale). Raises the first
        error."""
        replies: list = []
        for i in range(0, len(calls), PIPELINE_CALLS):
            chunk = calls[i : i + PIPELINE_CALLS]
            out: list = [None] * len(chunk)
            todo = list(range(len(chunk)))
            for attempt in (0, 1):
                pipe = self.client.pipeline(transaction=False)
                for j in todo:  # not Script(client=pipe): that adds a SCRIPT EXISTS round trip
                    script, keys, args = chunk[j]
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                for j, v in zip(todo, pipe.execute(raise_on_error=False)):
                    out[j] = v
                todo = [j for j in todo if isinstance(out[j], self.NoScriptError)]
                if not todo or attempt:
                    break
                for script in {chunk[j][0].sha: chunk[j][0] for j in todo}.values():
                    self.client.script_load(script.script)
            for v in out:
                if isinstance(v, Exception):
                    raise v
            replies += out
        return replies

    def tomb(self, session_id: str, incarnation: str) -> str:
        return f"{self.prefix}:x:{session_id}:{incarnation}"

    def drop_many(self, items: Sequence[tuple], owner: str) -> list[bool]:
        """Delete closed (or evicted) sessions' records and leases, pipelined; items:
        (session_id, incarnation, version, term, tombstone expire ms (0: none), "closed" |
        "evicted"), as `_DROP` decides: not another incarnation's record, nor a newer copy
        (another version or term, -1: any; or a lease another replica holds), except a record
        of a lower term (a stale copy written back); each leaves the tombstone of its
        incarnation and reason, so a replica holding an old copy knows it is gone, not lost.
        Refusals are logged. Returns, per item, whether it was deleted."""
        codes = self._run([
            (self._drop,
             (self.key(sid), self.lease(sid), self.tomb(sid, incarnation), self._generation_key),
             (owner, version, incarnation or "", expire_ms, reason, term, self.generation))
            for sid, incarnation, version, term, expire_ms, reason in items
        ])  # fmt: skip
        if RESET in codes:
            raise self._reset()
        for (sid, *_), code in zip(items, codes):
            if not code:
                log.info("session %s: its keys were left (another incarnation, or another "
                         "replica's newer copy)", sid)  # fmt: skip
        return [code == 1 for code in codes]

    def gone(self, session_id: str, incarnation: str) -> str | None:
        """ "closed" | "evicted" when that incarnation of `session_id` ended (its tombstone),
        else None."""
        return self.gone_many([(session_id, incarnation)])[0]

    def gone_many(self, items: Sequence[tuple[str, str]]) -> list[str | None]:
        """`gone` of each (session_id, incarnation), in one round trip (none for no items)."""
        if not items:
            return []
        tombs = self.client.mget([self.tomb(sid, incarnation) for sid, incarnation in items])
        return [None if v is None else (v.decode() or "closed") for v in tombs]
