// Local atproto network for end-to-end tests: an in-memory PLC directory and
// the reference PDS (@atproto/pds), both listening on 127.0.0.1 only, seeded
// with accounts and records, then driven by newline-delimited JSON commands
// on stdin (one JSON answer line per command on stdout).
//
// stdout carries ONLY protocol lines:
//   READY {json}            once, after start and seeding
//   {"ok":true,...}         one per command, in command order
//   {"ok":false,"error":"...","status"?:n,"body"?:{...}}
// Everything else (PDS/PLC logs, diagnostics) goes to stderr.
//
// Env (all optional):
//   PLC_PORT=0 PDS_PORT=0     0 = pick a free loopback port (the actual one is in READY)
//   ACCOUNTS=2 RECORDS=3      seeded accounts; posts per account (plus one profile record)
//   DATA_DIR=<fresh temp dir> PDS sqlite + blobs; a temp dir we made is removed on exit
//   KEEP_DATA=1               keep DATA_DIR on exit
//   ADMIN_PASSWORD=admin-pass PDS admin password (Basic auth, user "admin")
//   LOG_ENABLED=true          PDS/PLC logs, to stderr when it is a pipe or terminal, else to
//                             DATA_DIR/pds.log; LOG_DESTINATION=<file> overrides
//
// The process exits on the "exit" command, on stdin EOF (so a dropped test
// harness never leaves it behind), and on SIGINT/SIGTERM.
//
// See README.md for the full command list and field names.
import { fstatSync, rmSync } from 'node:fs'
import fs from 'node:fs/promises'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import readline from 'node:readline'

// ---- keep stdout clean -------------------------------------------------------
// The atproto loggers (pino) are off unless LOG_ENABLED is true; when on they
// write to fd 1 unless LOG_DESTINATION (read once, when their modules load,
// hence the dynamic imports below) names a file. Reopening /dev/stderr only
// works well for a pipe or a terminal: it fails with ENXIO on a socket (node's
// own child_process pipes are sockets) and, for a regular file, gets its own
// offset and overwrites our other stderr output. Otherwise log to DATA_DIR/pds.log.
const env = process.env
const ownDataDir = !env.DATA_DIR
const DATA_DIR = env.DATA_DIR || (await fs.mkdtemp(path.join(os.tmpdir(), 'localnet-')))
await fs.mkdir(DATA_DIR, { recursive: true })
// Also on crashes (an uncaught error still runs 'exit' handlers); not on SIGKILL.
process.on('exit', () => {
  if (ownDataDir && env.KEEP_DATA !== '1') rmSync(DATA_DIR, { recursive: true, force: true })
})
if (/^(true|t|1)$/i.test(env.LOG_ENABLED ?? '') && !env.LOG_DESTINATION) {
  const st = fstatSync(2)
  env.LOG_DESTINATION = st.isFIFO() || st.isCharacterDevice() ? '/dev/stderr' : path.join(DATA_DIR, 'pds.log')
}
const writeProtocolLine = (line) => process.stdout.write(line + '\n')
for (const m of ['log', 'info', 'debug', 'warn']) {
  console[m] = (...args) => console.error(...args)
}

const { Secp256k1Keypair } = await import('@atproto/crypto')
const { cborToLex, readCarWithRoot } = await import('@atproto/repo')
const { PDS } = await import('@atproto/pds')
const plcServer = (await import('@did-plc/server')).default

const HOST = '127.0.0.1'
const ACCOUNTS = intEnv('ACCOUNTS', 2)
const RECORDS = intEnv('RECORDS', 3)
const ADMIN_PASSWORD = env.ADMIN_PASSWORD || 'admin-pass'

function intEnv(name, dflt) {
  const raw = env[name]
  if (raw === undefined || raw === '') return dflt
  const n = Number(raw)
  if (!Number.isInteger(n) || n < 0) throw new Error(`${name} must be a non-negative integer, got ${raw}`)
  return n
}

// Both servers call app.listen(port) without a host, i.e. on every interface.
// Pin the host to loopback by wrapping listen (the xrpc websocket upgrade hook
// wraps the same function, so subscribeRepos keeps working).
const pinToLoopback = (app) => {
  const listen = app.listen
  app.listen = (port, ...rest) => listen.call(app, port, HOST, ...rest)
}

// A free loopback port, for servers whose port must be known before they start
// (the PDS writes its public URL, with port, into every DID document).
const freePort = () =>
  new Promise((resolve, reject) => {
    const srv = net.createServer()
    srv.once('error', reject)
    srv.listen(0, HOST, () => {
      const { port } = srv.address()
      srv.close(() => resolve(port))
    })
  })

// ---- PLC directory (in-memory) ----------------------------------------------
const { PlcServer, Database } = plcServer
const plc = PlcServer.create({ db: Database.mock(), port: intEnv('PLC_PORT', 0) })
pinToLoopback(plc.app)
const plcHttp = await plc.start()
const plcPort = plcHttp.address().port
const plcUrl = `http://${HOST}:${plcPort}`

// ---- PDS ----------------------------------------------------------------------
const startPds = async (port) => {
  const rotationKey = await Secp256k1Keypair.create({ exportable: true })
  const pds = await PDS.fromEnv({
    devMode: true, // allows the http:// public URL; SSRF protection off
    hostname: 'localhost', // only "localhost" gives an http:// public URL (http://localhost:<port>)
    port,
    dataDirectory: DATA_DIR,
    blobstoreDiskLocation: path.join(DATA_DIR, 'blobs'),
    didPlcUrl: plcUrl, // must be set: the default is the public PLC
    recoveryDidKey: (await Secp256k1Keypair.create()).did(),
    plcRotationKeyK256PrivateKeyHex: Buffer.from(await rotationKey.export()).toString('hex'),
    adminPassword: ADMIN_PASSWORD,
    jwtSecret: 'localnet-jwt-secret',
    serviceHandleDomains: ['.test'],
    inviteRequired: false,
    maxImportSize: 2 ** 30, // importRepo body limit (default would be the 5 MB blob limit)
    // Deliberately unset, each would make the PDS talk to the outside world:
    // crawlers, emailSmtpUrl, bskyAppViewUrl, modServiceUrl.
  })
  pinToLoopback(pds.app)
  await pds.start()
  return pds
}

let pds
let pdsPort = intEnv('PDS_PORT', 0)
if (pdsPort !== 0) {
  pds = await startPds(pdsPort)
} else {
  // freePort() is racy (the port is released before the PDS binds it): retry a few times.
  for (let attempt = 1; !pds; attempt++) {
    pdsPort = await freePort()
    try {
      pds = await startPds(pdsPort)
    } catch (err) {
      if (err?.code !== 'EADDRINUSE' || attempt >= 5) throw err
      console.error(`PDS port ${pdsPort} taken, retrying`)
    }
  }
}
const pdsUrl = `http://${HOST}:${pdsPort}`
const pdsPublicUrl = `http://localhost:${pdsPort}`
const adminAuth = 'Basic ' + Buffer.from(`admin:${ADMIN_PASSWORD}`).toString('base64')

// ---- XRPC helpers ---------------------------------------------------------------
class XrpcError extends Error {
  constructor(nsid, status, body) {
    super(`${nsid}: HTTP ${status} ${body?.error ?? ''} ${body?.message ?? ''}`.trim())
    this.status = status
    this.body = body
  }
}

// POST when body !== undefined (null = POST without a body), GET with params otherwise.
const xrpc = async (nsid, { body, params, auth } = {}) => {
  const url = new URL(`/xrpc/${nsid}`, pdsUrl)
  for (const [k, v] of Object.entries(params ?? {})) {
    if (v !== undefined && v !== null) url.searchParams.set(k, String(v))
  }
  const headers = {}
  if (auth) headers.authorization = auth
  const init = { method: body === undefined ? 'GET' : 'POST', headers }
  if (body instanceof Uint8Array) {
    headers['content-type'] = 'application/vnd.ipld.car'
    init.body = body
  } else if (body !== undefined && body !== null) {
    headers['content-type'] = 'application/json'
    init.body = JSON.stringify(body)
  }
  const res = await fetch(url, init)
  const ct = res.headers.get('content-type') ?? ''
  if (!res.ok) {
    const text = await res.text()
    let parsed
    try {
      parsed = JSON.parse(text)
    } catch {
      parsed = { message: text }
    }
    throw new XrpcError(nsid, res.status, parsed)
  }
  if (ct.includes('application/json')) return res.json()
  if (ct.includes('application/vnd.ipld.car')) return new Uint8Array(await res.arrayBuffer())
  await res.arrayBuffer()
  return {}
}

// did -> { did, handle, password, accessJwt, refreshJwt }
const sessions = new Map()
let handleCounter = 0

const sessionFor = (did) => {
  const s = sessions.get(did)
  if (!s) throw new Error(`unknown account ${did} (only accounts created by this network can be driven)`)
  return s
}

const login = async (s) => {
  const r = await xrpc('com.atproto.server.createSession', {
    body: { identifier: s.did, password: s.password },
  })
  s.accessJwt = r.accessJwt
  s.refreshJwt = r.refreshJwt
}

// An authenticated call as the account; on an auth failure (expired token,
// token scoped down after deactivation, ...) log in again and retry once.
const asUser = async (did, nsid, opts = {}) => {
  const s = sessionFor(did)
  try {
    return await xrpc(nsid, { ...opts, auth: `Bearer ${s.accessJwt}` })
  } catch (err) {
    const authish =
      err instanceof XrpcError &&
      (err.status === 401 ||
        ['ExpiredToken', 'InvalidToken', 'AuthRequired', 'AuthMissing'].includes(err.body?.error))
    if (!authish) throw err
    await login(s)
    return xrpc(nsid, { ...opts, auth: `Bearer ${s.accessJwt}` })
  }
}

const asAdmin = (nsid, opts = {}) => xrpc(nsid, { ...opts, auth: adminAuth })

const signingKeyOf = async (did) => {
  const res = await fetch(`${plcUrl}/${did}/data`)
  if (!res.ok) return null
  const data = await res.json()
  return data?.verificationMethods?.atproto ?? null
}

const publicAccount = (s) => ({
  did: s.did,
  handle: s.handle,
  password: s.password,
  accessJwt: s.accessJwt,
  refreshJwt: s.refreshJwt,
  signingKey: s.signingKey,
})

const createAccount = async ({ handle, email, password } = {}) => {
  const n = handleCounter++
  handle ??= `user${n}.test`
  password ??= 'password'
  email ??= `${handle.replace(/[^a-z0-9]/gi, '-')}@example.test`
  const r = await xrpc('com.atproto.server.createAccount', { body: { handle, email, password } })
  const s = { did: r.did, handle: r.handle ?? handle, password, accessJwt: r.accessJwt, refreshJwt: r.refreshJwt }
  s.signingKey = await signingKeyOf(s.did)
  sessions.set(s.did, s)
  return s
}

const WRITE_TYPE = {
  create: 'com.atproto.repo.applyWrites#create',
  update: 'com.atproto.repo.applyWrites#update',
  delete: 'com.atproto.repo.applyWrites#delete',
}

// Accepts either the lexicon form ({$type, collection, rkey?, value?}) or the
// short form ({action:"create"|"update"|"delete", collection, rkey?, value?|record?}).
const toLexWrite = (w) => {
  if (w?.$type) return w
  const $type = WRITE_TYPE[w?.action]
  if (!$type) throw new Error(`write needs $type or action create|update|delete: ${JSON.stringify(w)}`)
  const out = { $type, collection: w.collection }
  if (w.rkey !== undefined) out.rkey = w.rkey
  if (w.action !== 'delete') out.value = w.value ?? w.record
  return out
}

const rkeyOfUri = (uri) => uri.split('/').pop()

const need = (args, ...names) => {
  for (const n of names) {
    if (args[n] === undefined || args[n] === null || args[n] === '') throw new Error(`missing field "${n}"`)
  }
}

// ---- seeding --------------------------------------------------------------------------
const t0 = performance.now()
const seeded = []
for (let i = 0; i < ACCOUNTS; i++) {
  const s = await createAccount()
  const writes = [
    {
      action: 'create',
      collection: 'app.bsky.actor.profile',
      rkey: 'self',
      value: { $type: 'app.bsky.actor.profile', displayName: `User ${i}` },
    },
  ]
  for (let r = 0; r < RECORDS; r++) {
    writes.push({
      action: 'create',
      collection: 'app.bsky.feed.post',
      value: { $type: 'app.bsky.feed.post', text: `seed post ${r} of ${s.handle}`, createdAt: new Date().toISOString() },
    })
  }
  // applyWrites takes at most 200 writes per call (one commit each)
  for (let k = 0; k < writes.length; k += 200) {
    await asUser(s.did, 'com.atproto.repo.applyWrites', {
      body: { repo: s.did, writes: writes.slice(k, k + 200).map(toLexWrite) },
    })
  }
  seeded.push(s.did)
}
const seedMs = Math.round(performance.now() - t0)

const readyInfo = () => ({
  plcUrl,
  pdsUrl,
  pdsPublicUrl,
  relayUrl: `ws://${HOST}:${pdsPort}`,
  plcPort,
  pdsPort,
  adminPassword: ADMIN_PASSWORD,
  dataDir: DATA_DIR,
  seedRecordsPerAccount: RECORDS + 1,
  accounts: seeded.map((did) => publicAccount(sessions.get(did))),
})

// ---- commands ----------------------------------------------------------------------------
const commands = {
  info: async () => readyInfo(),

  createAccount: async (a) => publicAccount(await createAccount(a)),

  createRecord: async (a) => {
    need(a, 'did', 'collection', 'record')
    const r = await asUser(a.did, 'com.atproto.repo.createRecord', {
      body: { repo: a.did, collection: a.collection, rkey: a.rkey, record: a.record, validate: a.validate },
    })
    return { ...r, rkey: rkeyOfUri(r.uri), path: `${a.collection}/${rkeyOfUri(r.uri)}` }
  },

  putRecord: async (a) => {
    need(a, 'did', 'collection', 'rkey', 'record')
    const r = await asUser(a.did, 'com.atproto.repo.putRecord', {
      body: { repo: a.did, collection: a.collection, rkey: a.rkey, record: a.record, validate: a.validate },
    })
    return { ...r, rkey: a.rkey, path: `${a.collection}/${a.rkey}` }
  },

  deleteRecord: async (a) => {
    need(a, 'did', 'collection', 'rkey')
    const r = await asUser(a.did, 'com.atproto.repo.deleteRecord', {
      body: { repo: a.did, collection: a.collection, rkey: a.rkey },
    })
    return { ...r, path: `${a.collection}/${a.rkey}` }
  },

  applyWrites: async (a) => {
    need(a, 'did', 'writes')
    if (!Array.isArray(a.writes)) throw new Error('"writes" must be an array')
    return asUser(a.did, 'com.atproto.repo.applyWrites', {
      body: { repo: a.did, writes: a.writes.map(toLexWrite), validate: a.validate },
    })
  },

  updateHandle: async (a) => {
    need(a, 'did', 'handle')
    await asUser(a.did, 'com.atproto.identity.updateHandle', { body: { handle: a.handle } })
    sessionFor(a.did).handle = a.handle
    return { did: a.did, handle: a.handle }
  },

  deactivateAccount: async (a) => {
    need(a, 'did')
    await asUser(a.did, 'com.atproto.server.deactivateAccount', { body: {} })
    return { did: a.did }
  },

  activateAccount: async (a) => {
    need(a, 'did')
    // the endpoint rejects any request body
    await asUser(a.did, 'com.atproto.server.activateAccount', { body: null })
    return { did: a.did }
  },

  takedownAccount: async (a) => {
    need(a, 'did')
    const applied = a.applied ?? true
    await asAdmin('com.atproto.admin.updateSubjectStatus', {
      body: {
        subject: { $type: 'com.atproto.admin.defs#repoRef', did: a.did },
        takedown: { applied, ref: 'localnet' },
      },
    })
    return { did: a.did, applied }
  },

  deleteAccount: async (a) => {
    need(a, 'did')
    await asAdmin('com.atproto.admin.deleteAccount', { body: { did: a.did } })
    sessions.delete(a.did)
    return { did: a.did }
  },

  getRepoCar: async (a) => {
    need(a, 'did', 'path')
    const car = await xrpc('com.atproto.sync.getRepo', { params: { did: a.did, since: a.since } })
    await fs.writeFile(a.path, car)
    const { root, blocks } = await readCarWithRoot(car)
    const commit = cborToLex(blocks.get(root))
    return { did: a.did, path: a.path, bytes: car.length, root: root.toString(), rev: commit.rev }
  },

  listRecords: async (a) => {
    need(a, 'did')
    // Straight from the PDS's own record index (in-process): describeRepo would
    // try to resolve the account's .test handle and fail.
    const all = await pds.ctx.actorStore.read(a.did, (store) => store.record.listAll())
    const records = all.map((r) => ({ path: r.path, cid: r.cid.toString() }))
    records.sort((x, y) => (x.path < y.path ? -1 : x.path > y.path ? 1 : 0))
    const latest = await xrpc('com.atproto.sync.getLatestCommit', { params: { did: a.did } })
    return { did: a.did, count: records.length, commit: latest.cid, rev: latest.rev, records }
  },

  getRecord: async (a) => {
    need(a, 'did', 'collection', 'rkey')
    const r = await xrpc('com.atproto.repo.getRecord', {
      params: { repo: a.did, collection: a.collection, rkey: a.rkey },
    })
    return { uri: r.uri, cid: r.cid, value: r.value }
  },

  importRepo: async (a) => {
    need(a, 'did', 'path')
    const car = new Uint8Array(await fs.readFile(a.path))
    await asUser(a.did, 'com.atproto.repo.importRepo', { body: car })
    // NB: importRepo emits no firehose event and stores a fresh rev that differs
    // from the rev inside the imported commit until the next write.
    const latest = await xrpc('com.atproto.sync.getLatestCommit', { params: { did: a.did } })
    return { did: a.did, bytes: car.length, commit: latest.cid, rev: latest.rev }
  },

  awaitSequenced: async (a) => {
    // The PDS writes an event to its repo_seq table at once but its sequencer only
    // broadcasts it on the next poll (backing off up to a second when idle), so a
    // subscriber that connects without a cursor right after a write may still see it
    // live. This waits until everything written so far has been broadcast.
    const sequencer = pds.ctx.sequencer
    const target = (await sequencer.curr()) ?? 0
    const deadline = Date.now() + (a.timeoutMs ?? 10_000)
    while (sequencer.lastSeen < target) {
      if (Date.now() > deadline) throw new Error(`sequencer stuck at ${sequencer.lastSeen} < ${target}`)
      await new Promise((resolve) => setTimeout(resolve, 5))
    }
    return { seq: target }
  },

  getSigningKey: async (a) => {
    need(a, 'did')
    // the account's repo signing key, as the PDS keeps it (raw 32-byte secp256k1 secret)
    const { keyLocation } = await pds.ctx.actorStore.getLocation(a.did)
    const raw = await fs.readFile(keyLocation)
    return { did: a.did, didKey: await signingKeyOf(a.did), privateKeyHex: raw.toString('hex') }
  },

  exit: async () => ({}),
}

// ---- main loop ------------------------------------------------------------------------------
let shuttingDown = false
const shutdown = async (code = 0) => {
  if (shuttingDown) return
  shuttingDown = true
  try {
    await pds.destroy()
    await plc.destroy()
  } catch (err) {
    console.error('shutdown error:', err)
  }
  process.exit(code) // the 'exit' handler removes a temp DATA_DIR
}
process.on('SIGINT', () => shutdown(0))
process.on('SIGTERM', () => shutdown(0))

writeProtocolLine('READY ' + JSON.stringify(readyInfo()))
console.error(`localnet: PLC ${plcUrl}, PDS ${pdsUrl} (public ${pdsPublicUrl}), ${ACCOUNTS} accounts seeded in ${seedMs} ms`)

const handleLine = async (line) => {
  if (line.trim() === '') return
  let msg
  try {
    msg = JSON.parse(line)
  } catch (err) {
    writeProtocolLine(JSON.stringify({ ok: false, error: `invalid JSON: ${err.message}` }))
    return
  }
  const reqId = msg?.reqId
  const echo = reqId === undefined ? {} : { reqId }
  const fn = commands[msg?.cmd]
  if (!fn) {
    writeProtocolLine(JSON.stringify({ ok: false, ...echo, error: `unknown cmd ${JSON.stringify(msg?.cmd)}` }))
    return
  }
  try {
    const result = await fn(msg)
    writeProtocolLine(JSON.stringify({ ok: true, ...echo, ...result }))
  } catch (err) {
    const out = { ok: false, ...echo, error: err?.message ?? String(err) }
    if (err instanceof XrpcError) {
      out.status = err.status
      out.body = err.body
    }
    writeProtocolLine(JSON.stringify(out))
  }
  if (msg.cmd === 'exit') await shutdown(0)
}

// Commands run strictly one after another, so answers come back in order.
let queue = Promise.resolve()
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity })
rl.on('line', (line) => {
  queue = queue.then(() => handleLine(line))
})
rl.on('close', () => {
  queue = queue.then(() => shutdown(0))
})
