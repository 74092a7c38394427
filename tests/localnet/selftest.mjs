// Self-test of the localnet kit: drives every script the way a Rust test
// would (child processes, JSON lines on stdin/stdout) and checks the answers.
// usage: . ./env.sh && node selftest.mjs      (exit 0 = all checks passed)
import { spawn } from 'node:child_process'
import fs from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import readline from 'node:readline'
import { fileURLToPath } from 'node:url'
import { TID } from '@atproto/common'
import { Secp256k1Keypair } from '@atproto/crypto'
import { MemoryBlockstore, Repo, WriteOpAction, blocksToCarFile } from '@atproto/repo'

const HERE = path.dirname(fileURLToPath(import.meta.url))
const TIMEOUT_MS = 60_000
let failures = 0
const check = (cond, what, detail) => {
  if (cond) console.log(`ok   ${what}`)
  else {
    failures++
    console.log(`FAIL ${what}${detail === undefined ? '' : ': ' + JSON.stringify(detail)}`)
  }
}

// A child speaking JSON lines; next(pred) waits for the first matching line.
class Child {
  constructor(script, env = {}, args = []) {
    this.proc = spawn(process.execPath, [path.join(HERE, script), ...args], {
      env: { ...process.env, ...env },
      stdio: ['pipe', 'pipe', 'pipe'],
    })
    this.lines = []
    this.waiters = []
    this.stderr = ''
    this.proc.stderr.on('data', (d) => (this.stderr += d))
    this.exited = new Promise((resolve) => this.proc.on('exit', (code) => resolve(code)))
    readline.createInterface({ input: this.proc.stdout }).on('line', (line) => {
      const parsed = line.startsWith('READY ') ? { READY: JSON.parse(line.slice(6)) } : JSON.parse(line)
      this.lines.push(parsed)
      this.poke()
    })
  }
  poke() {
    for (const w of [...this.waiters]) {
      const i = this.lines.findIndex(w.pred)
      if (i >= 0) {
        this.waiters.splice(this.waiters.indexOf(w), 1)
        w.resolve(this.lines.splice(i, 1)[0])
      }
    }
  }
  next(pred, what = 'line') {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}; stderr: ${this.stderr.slice(-2000)}`)), TIMEOUT_MS)
      this.waiters.push({ pred, resolve: (v) => (clearTimeout(timer), resolve(v)) })
      this.poke()
    })
  }
  send(obj) {
    this.proc.stdin.write(JSON.stringify(obj) + '\n')
  }
  // for scripts whose every answer carries kind:"response"
  async cmd(obj) {
    this.send(obj)
    return this.next((l) => l.kind === 'response' && l.cmd === obj.cmd, `response to ${obj.cmd}`)
  }
}

// network.mjs answers every command with exactly one line, in order
const netCmd = async (net, obj) => {
  net.send(obj)
  return net.next((l) => 'ok' in l, `answer to ${obj.cmd}`)
}

const run = (script, args) =>
  new Promise((resolve) => {
    const p = spawn(process.execPath, [path.join(HERE, script), ...args], { stdio: ['ignore', 'pipe', 'inherit'] })
    let out = ''
    p.stdout.on('data', (d) => (out += d))
    p.on('exit', (code) => resolve({ code, json: out.trim() ? JSON.parse(out.trim()) : null }))
  })

const tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'localnet-selftest-'))
try {
  // ---------------- network.mjs + verify-car.mjs ----------------
  let t = performance.now()
  const net = new Child('network.mjs', { ACCOUNTS: '2', RECORDS: '3' })
  const { READY: ready } = await net.next((l) => l.READY, 'READY')
  console.log(`network READY in ${Math.round(performance.now() - t)} ms: plc ${ready.plcUrl}, pds ${ready.pdsUrl}`)
  check(ready.accounts.length === 2 && ready.accounts.every((a) => a.did.startsWith('did:plc:') && a.accessJwt), 'READY lists 2 seeded accounts')
  check(/^http:\/\/127\.0\.0\.1:\d+$/.test(ready.plcUrl) && /^http:\/\/127\.0\.0\.1:\d+$/.test(ready.pdsUrl), 'servers on 127.0.0.1')
  const [a0, a1] = ready.accounts

  const created = await netCmd(net, {
    cmd: 'createRecord',
    did: a0.did,
    collection: 'app.bsky.feed.post',
    record: { $type: 'app.bsky.feed.post', text: 'hello from selftest', createdAt: new Date().toISOString() },
  })
  check(created.ok && created.cid && created.rkey && created.commit?.rev, 'createRecord', created)
  const put = await netCmd(net, { cmd: 'putRecord', did: a0.did, collection: 'com.example.thing', rkey: 'k1', record: { $type: 'com.example.thing', b: { $bytes: 'AAEC' } } })
  check(put.ok, 'putRecord (create via put, with $bytes)', put)
  const aw = await netCmd(net, {
    cmd: 'applyWrites',
    did: a0.did,
    writes: [
      { action: 'update', collection: 'com.example.thing', rkey: 'k1', value: { $type: 'com.example.thing', v: 2 } },
      { action: 'create', collection: 'com.example.thing', rkey: 'k2', value: { $type: 'com.example.thing' } },
    ],
  })
  check(aw.ok && aw.results?.length === 2, 'applyWrites', aw)
  const del = await netCmd(net, { cmd: 'deleteRecord', did: a0.did, collection: 'com.example.thing', rkey: 'k2' })
  check(del.ok, 'deleteRecord', del)

  const listed = await netCmd(net, { cmd: 'listRecords', did: a0.did })
  // seeded: profile + 3 posts; then +1 post, +k1
  check(listed.ok && listed.count === 6, 'listRecords counts 6 records', listed)
  const carPath = path.join(tmp, 'a0.car')
  const car = await netCmd(net, { cmd: 'getRepoCar', did: a0.did, path: carPath })
  check(car.ok && car.bytes > 0 && car.rev === listed.rev && car.root === listed.commit, 'getRepoCar matches latest commit', car)
  const v = await run('verify-car.mjs', [carPath, a0.did, a0.signingKey, '--list'])
  check(v.code === 0 && v.json.ok && v.json.records === 6 && v.json.mstCanonical, 'verify-car accepts the PDS CAR', v.json)
  check(
    JSON.stringify(v.json.paths) === JSON.stringify(listed.records),
    'verify-car paths/CIDs equal listRecords',
  )
  const vBadKey = await run('verify-car.mjs', [carPath, a0.did, a1.signingKey])
  check(vBadKey.code === 1 && vBadKey.json.ok === false, 'verify-car rejects a wrong signing key', vBadKey.json)
  const vBadDid = await run('verify-car.mjs', [carPath, a1.did, '-'])
  check(vBadDid.code === 1, 'verify-car rejects a wrong DID', vBadDid.json)
  const corrupt = Buffer.from(await fs.readFile(carPath))
  corrupt[corrupt.length - 3] ^= 0xff
  await fs.writeFile(path.join(tmp, 'corrupt.car'), corrupt)
  const vCorrupt = await run('verify-car.mjs', [path.join(tmp, 'corrupt.car'), a0.did, '-'])
  check(vCorrupt.code === 1, 'verify-car rejects a corrupted block', vCorrupt.json)

  // importRepo: build a signed repo with the account's own key, import, re-fetch, verify
  const sk = await netCmd(net, { cmd: 'getSigningKey', did: a1.did })
  check(sk.ok && sk.didKey === a1.signingKey && sk.privateKeyHex.length === 64, 'getSigningKey', sk)
  const keypair = await Secp256k1Keypair.import(Buffer.from(sk.privateKeyHex, 'hex'))
  const storage = new MemoryBlockstore()
  const ops = []
  for (let i = 0; i < 50; i++) {
    ops.push({ action: WriteOpAction.Create, collection: 'app.bsky.feed.post', rkey: TID.nextStr(), record: { $type: 'app.bsky.feed.post', text: `imported ${i}`, createdAt: new Date().toISOString() } })
  }
  const repo = await Repo.create(storage, a1.did, keypair, ops)
  const importPath = path.join(tmp, 'import.car')
  await fs.writeFile(importPath, await blocksToCarFile(repo.cid, storage.blocks))
  const vImport = await run('verify-car.mjs', [importPath, a1.did, a1.signingKey])
  check(vImport.code === 0 && vImport.json.records === 50, 'verify-car accepts a CAR built with @atproto/repo', vImport.json)
  const imp = await netCmd(net, { cmd: 'importRepo', did: a1.did, path: importPath })
  check(imp.ok, 'importRepo', imp)
  const afterImport = await netCmd(net, { cmd: 'listRecords', did: a1.did })
  check(afterImport.ok && afterImport.count === 50, 'listRecords after importRepo shows the imported records', afterImport.count)

  // lifecycle
  const acc = await netCmd(net, { cmd: 'createAccount', handle: 'selftest.test' })
  check(acc.ok && acc.did && acc.handle === 'selftest.test' && acc.signingKey?.startsWith('did:key:'), 'createAccount', acc)
  const uh = await netCmd(net, { cmd: 'updateHandle', did: acc.did, handle: 'renamed-selftest.test' })
  check(uh.ok, 'updateHandle', uh)
  const plcDoc = await (await fetch(`${ready.plcUrl}/${acc.did}`)).json()
  check(plcDoc.alsoKnownAs?.includes('at://renamed-selftest.test'), 'PLC doc carries the new handle', plcDoc.alsoKnownAs)
  check((await netCmd(net, { cmd: 'deactivateAccount', did: acc.did })).ok, 'deactivateAccount')
  const deact = await netCmd(net, { cmd: 'getRepoCar', did: acc.did, path: path.join(tmp, 'x.car') })
  check(!deact.ok && deact.body?.error === 'RepoDeactivated', 'getRepo of a deactivated account fails with RepoDeactivated', deact)
  check((await netCmd(net, { cmd: 'activateAccount', did: acc.did })).ok, 'activateAccount')
  check((await netCmd(net, { cmd: 'takedownAccount', did: acc.did })).ok, 'takedownAccount')
  check((await netCmd(net, { cmd: 'takedownAccount', did: acc.did, applied: false })).ok, 'takedownAccount applied:false')
  check((await netCmd(net, { cmd: 'deleteAccount', did: acc.did })).ok, 'deleteAccount')
  const gone = await netCmd(net, { cmd: 'getRepoCar', did: acc.did, path: path.join(tmp, 'x.car') })
  check(!gone.ok && gone.body?.error === 'RepoNotFound', 'getRepo of a deleted account fails with RepoNotFound', gone)
  const bad = await netCmd(net, { cmd: 'nope', reqId: 9 })
  check(!bad.ok && bad.reqId === 9, 'unknown command is answered ok:false with reqId', bad)
  const missing = await netCmd(net, { cmd: 'createRecord' })
  check(!missing.ok && /missing field/.test(missing.error), 'missing field is reported', missing)
  await netCmd(net, { cmd: 'exit' })
  check((await net.exited) === 0, 'network.mjs exits 0 on exit')
  check(!(await fs.stat(ready.dataDir).catch(() => null)), 'network.mjs removed its temp data dir')

  // ---------------- mock-tap.mjs + tap-consumer.mjs ----------------
  const mock = new Child('mock-tap.mjs', { TAP_ADMIN_PASSWORD: 'secret' })
  const { READY: mockReady } = await mock.next((l) => l.READY, 'mock READY')
  const consumer = new Child('tap-consumer.mjs', { TAP_URL: mockReady.url, TAP_ADMIN_PASSWORD: 'secret' })
  await consumer.next((l) => l.kind === 'ready', 'consumer ready')
  const conn = await mock.next((l) => l.kind === 'connection', 'ws connection')
  check(conn.auth === 'Basic ' + Buffer.from('admin:secret').toString('base64'), 'channel upgrade carries Basic admin auth', conn)

  const did = a0.did
  const cid = created.cid
  const addResp = await consumer.cmd({ cmd: 'addRepos', dids: [did] })
  check(addResp.ok, 'consumer addRepos', addResp)
  const addHttp = await mock.next((l) => l.kind === 'http' && l.path === '/repos/add', '/repos/add')
  check(addHttp.contentType === 'application/json' && JSON.parse(addHttp.body).dids[0] === did && addHttp.auth === conn.auth, 'addRepos sends JSON {"dids"} with auth', addHttp)
  const info = await consumer.cmd({ cmd: 'getRepoInfo', did })
  check(info.ok && info.result.state === 'pending' && info.result.records === 0, 'consumer getRepoInfo', info)
  const unresolved = await consumer.cmd({ cmd: 'resolveDid', did })
  check(unresolved.ok && unresolved.result === null, 'resolveDid 404 -> null', unresolved)
  await mock.cmd({ cmd: 'setDidDoc', did, doc: { id: did, alsoKnownAs: ['at://user0.test'] } })
  const resolved = await consumer.cmd({ cmd: 'resolveDid', did })
  check(resolved.ok && resolved.result?.id === did, 'resolveDid returns the document', resolved)

  const events = [
    { id: 1, type: 'identity', identity: { did, handle: 'user0.test', is_active: true, status: 'active' } },
    { id: 2, type: 'record', record: { live: false, did, rev: '3n2v3qv5nzn26', collection: 'app.bsky.feed.post', rkey: '3n2v3qv3aue26', action: 'create', cid, record: { $type: 'app.bsky.feed.post', text: 'hi', createdAt: '2026-01-01T00:00:00.000Z', l: { $link: cid }, b: { $bytes: 'AAEC' } } } },
    { id: 3, type: 'record', record: { live: true, did, rev: '3n2v3qv5nzn28', collection: 'app.bsky.feed.post', rkey: '3n2v3qv3aue26', action: 'delete' } },
  ]
  for (const event of events) await mock.cmd({ cmd: 'send', event })
  const e1 = await consumer.next((l) => l.kind === 'event' && l.id === 1, 'event 1')
  check(e1.type === 'identity' && e1.handle === 'user0.test' && e1.isActive === true && e1.acked, 'identity event delivered', e1)
  const e2 = await consumer.next((l) => l.kind === 'event' && l.id === 2, 'event 2')
  check(e2.type === 'record' && e2.live === false && e2.cid === cid && e2.record.l.$link === cid && e2.record.b.$bytes === 'AAEC', 'record event delivered with $link/$bytes', e2)
  const e3 = await consumer.next((l) => l.kind === 'event' && l.id === 3, 'event 3')
  check(e3.action === 'delete' && e3.record === undefined && e3.live === true, 'delete event delivered', e3)
  for (const id of [1, 2, 3]) {
    const ack = await mock.next((l) => l.kind === 'ack' && l.id === id, `ack ${id}`)
    check(ack.id === id, `client acked ${id} with {"type":"ack","id":${id}}`)
  }
  // invalid events: no ack, an error line instead
  await mock.cmd({ cmd: 'send', event: { id: 4, type: 'identity', identity: { did, handle: '', is_active: true, status: 'active' } } })
  const parseErr = await consumer.next((l) => l.kind === 'error', 'parse error')
  check(/Failed to parse/.test(parseErr.error), 'empty handle is rejected by the client', parseErr)
  // withheld ack
  await consumer.cmd({ cmd: 'setAck', ack: false })
  await mock.cmd({ cmd: 'send', event: { ...events[0], id: 5 } })
  const e5 = await consumer.next((l) => l.kind === 'event' && l.id === 5, 'event 5')
  check(e5.acked === false, 'setAck false: event reported as not acked', e5)
  await consumer.cmd({ cmd: 'setAck', ack: true })
  await mock.cmd({ cmd: 'send', event: { ...events[0], id: 6 } })
  await mock.next((l) => l.kind === 'ack' && l.id === 6, 'ack 6')
  const st = await mock.cmd({ cmd: 'state' })
  check(JSON.stringify(st.acked) === '[1,2,3,6]', 'acks seen by server: 1,2,3,6 (none for the invalid 4 or withheld 5)', st.acked)
  // TCP drop (client sees 1006): the client reconnects by itself and keeps going
  await mock.cmd({ cmd: 'drop' })
  const again = await mock.next((l) => l.kind === 'connection' && l.conn > conn.conn, 'reconnection')
  check(again.auth === conn.auth, 'after a TCP drop (1006) the client reconnects', again)
  await mock.cmd({ cmd: 'send', event: { ...events[0], id: 7 } })
  const ack7 = await mock.next((l) => l.kind === 'ack' && l.id === 7, 'ack 7 after reconnect')
  check(ack7.conn === again.conn, 'events flow and are acked on the new connection', ack7)
  // server closes with a close frame: the client ends (no reconnect)
  await mock.cmd({ cmd: 'close', code: 1000 })
  const closed = await consumer.next((l) => l.kind === 'closed', 'consumer closed')
  check(closed.code === 3 && (await consumer.exited) === 3, 'clean close frame ends the client session (exit 3)', closed)

  // wrong password: upgrade refused with 401, client gives up
  const wrong = new Child('tap-consumer.mjs', { TAP_URL: mockReady.url, TAP_ADMIN_PASSWORD: 'wrong' })
  const wrongClosed = await wrong.next((l) => l.kind === 'closed', 'closed after 401')
  check(wrongClosed.code === 1 && /401/.test(wrongClosed.reason), 'a 401 on upgrade fails the channel (exit 1)', wrongClosed)
  await mock.cmd({ cmd: 'exit' })

  // nothing listening: clean failure after MAX_CONNECT_FAILURES
  const nobody = new Child('tap-consumer.mjs', { TAP_URL: `http://127.0.0.1:${mockReady.port}`, MAX_CONNECT_FAILURES: '2' })
  const nobodyClosed = await nobody.next((l) => l.kind === 'closed', 'closed after refused connects')
  check(nobodyClosed.code === 1 && /ECONNREFUSED/.test(nobodyClosed.reason), 'refused connections end in a clean failure', nobodyClosed)

  // ---------------- webhook-check.mjs ----------------
  const hook = new Child('webhook-check.mjs', { TAP_ADMIN_PASSWORD: 'secret' })
  const { READY: hookReady } = await hook.next((l) => l.READY, 'webhook READY')
  const post = (body, auth) =>
    fetch(hookReady.url, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...(auth ? { authorization: auth } : {}) },
      body: typeof body === 'string' ? body : JSON.stringify(body),
    }).then((r) => r.status)
  check((await post(events[1], conn.auth)) === 200, 'webhook: valid event + auth -> 200')
  const okLine = await hook.next((l) => l.kind === 'request', 'webhook line')
  check(okLine.ok && okLine.event.id === 2 && okLine.event.record.b.$bytes === 'AAEC', 'webhook line carries the parsed event', okLine)
  check((await post(events[1], 'Basic ' + Buffer.from('admin:nope').toString('base64'))) === 400, 'webhook: wrong password -> 400')
  check((await post(events[1])) === 400, 'webhook: missing auth -> 400')
  check((await post({ id: 1, type: 'account' }, conn.auth)) === 400, 'webhook: unknown event type -> 400')
  check((await post('{not json', conn.auth)) === 400, 'webhook: malformed JSON -> 400')
  await hook.cmd({ cmd: 'failNext', n: 1, status: 503 })
  check((await post(events[0], conn.auth)) === 503, 'webhook: failNext answers 503 once')
  check((await post(events[0], conn.auth)) === 200, 'webhook: then 200 again')
  const hs = await hook.cmd({ cmd: 'stats' })
  check(hs.accepted === 2 && hs.rejected === 4 && hs.failedOnPurpose === 1, 'webhook stats', hs)
  await hook.cmd({ cmd: 'exit' })
} catch (err) {
  failures++
  console.log('FAIL (exception)', err)
} finally {
  await fs.rm(tmp, { recursive: true, force: true })
}
console.log(failures === 0 ? 'selftest: all checks passed' : `selftest: ${failures} check(s) FAILED`)
process.exit(failures === 0 ? 0 : 1)
