// Conformance consumer: the UNMODIFIED reference client (@atproto/tap: Tap +
// SimpleIndexer over TapChannel) connected to a tap server, reporting what it
// sees as JSON lines on stdout and taking commands as JSON lines on stdin.
//
// Env:
//   TAP_URL=http://127.0.0.1:2480   base URL of the tap server (http:// or https://)
//   TAP_ADMIN_PASSWORD=             optional; sent as Basic admin auth on every request
//   MAX_CONNECT_FAILURES=0          >0: give up (exit 1) after this many failed first connects
//   ACK=1                           0: start with acks withheld (see the setAck command)
//
// stdout lines (all JSON objects with a "kind"):
//   {"kind":"ready","url":...}                                once, at start
//   {"kind":"event","id":N,"type":"record","action":...,"did":...,"rev":...,
//    "collection":...,"rkey":...,"record"?:{...},"cid"?:...,"live":bool,"acked":bool}
//   {"kind":"event","id":N,"type":"identity","did":...,"handle":...,"isActive":bool,
//    "status":...,"acked":bool}
//      (the client's parsed event; record JSON uses $link / $bytes; "acked" says
//       whether the client will send {"type":"ack","id":N} for it)
//   {"kind":"error","error":"Failed to parse message","cause":"..."}   client-reported errors
//   {"kind":"reconnecting","error":"ECONNREFUSED","initialSetup":bool,"attempt":n}
//   {"kind":"response","cmd":...,"ok":true,"result":...}  / {"kind":"response","ok":false,"error":...}
//   {"kind":"closed","reason":...,"code":n}               last line before exiting
//
// stdin commands (one JSON object per line, optional "reqId" echoed back):
//   {"cmd":"addRepos","dids":[...]}      {"cmd":"removeRepos","dids":[...]}
//   {"cmd":"getRepoInfo","did":...}      -> result {did,handle,state,rev,records,error?,retries?}
//   {"cmd":"resolveDid","did":...}       -> result DID document or null (404)
//   {"cmd":"setAck","ack":bool}          false: the handler throws, so the client does not ack
//                                        (its normal "let Tap retry" path)
//   {"cmd":"stats"}                      -> result {events,record,identity,errors,acked}
//   {"cmd":"exit"}
// Exit codes: 0 on exit command / stdin EOF, 3 when the server closed the channel
// cleanly (the client does not reconnect then), 1 when the channel failed.
import readline from 'node:readline'
import { lexToJson } from '@atproto/lex'
import { SimpleIndexer, Tap } from '@atproto/tap'

const writeLine = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
for (const m of ['log', 'info', 'debug', 'warn']) {
  console[m] = (...args) => console.error(...args)
}

const env = process.env
const url = env.TAP_URL || 'http://127.0.0.1:2480'
const maxConnectFailures = Number(env.MAX_CONNECT_FAILURES || 0)
let ackEnabled = env.ACK !== '0'

let tap
try {
  tap = new Tap(url, { adminPassword: env.TAP_ADMIN_PASSWORD || undefined })
} catch (err) {
  writeLine({ kind: 'closed', reason: `invalid TAP_URL: ${err.message}`, code: 1 })
  process.exit(1)
}

const stats = { events: 0, record: 0, identity: 0, errors: 0, acked: 0 }

// Handler for both event types: report, then either return (SimpleIndexer
// acks) or throw (the client then skips the ack so tap redelivers).
const onEvent = async (evt) => {
  stats.events++
  stats[evt.type]++
  const acked = ackEnabled
  writeLine({ kind: 'event', ...lexToJson(evt), acked })
  if (!acked) throw new Error(`ack withheld for event ${evt.id}`)
  stats.acked++
}

const indexer = new SimpleIndexer()
indexer.record(onEvent)
indexer.identity(onEvent)
indexer.error((err) => {
  // the withheld-ack errors are our own doing, not worth a line
  if (String(err.cause?.message ?? '').startsWith('ack withheld')) return
  stats.errors++
  writeLine({ kind: 'error', error: err.message, cause: errText(err.cause) })
})

function errText(err) {
  if (err === undefined || err === null) return undefined
  return err.code ? `${err.code}: ${err.message}` : (err.message ?? String(err))
}

let initialFailures = 0
const channel = tap.channel(indexer, {
  onReconnectError: (error, attempt, initialSetup) => {
    writeLine({ kind: 'reconnecting', error: errText(error), initialSetup, attempt })
    if (initialSetup && maxConnectFailures > 0 && ++initialFailures >= maxConnectFailures) {
      finish(1, `could not connect after ${initialFailures} attempts: ${errText(error)}`)
    }
  },
})

let finishing = false
async function finish(code, reason) {
  if (finishing) return
  finishing = true
  await channel.destroy().catch(() => {})
  writeLine({ kind: 'closed', reason, code })
  process.exit(code)
}

writeLine({ kind: 'ready', url })
channel.start().then(
  // start() resolves when the server ends the socket with a close frame
  () => finish(3, 'channel closed by server'),
  (err) => finish(1, `channel failed: ${errText(err)}`),
)

const commands = {
  addRepos: async (a) => {
    await tap.addRepos(a.dids)
    return null
  },
  removeRepos: async (a) => {
    await tap.removeRepos(a.dids)
    return null
  },
  getRepoInfo: async (a) => tap.getRepoInfo(a.did),
  resolveDid: async (a) => {
    const doc = await tap.resolveDid(a.did)
    return doc === null ? null : lexToJson(doc)
  },
  setAck: async (a) => {
    ackEnabled = a.ack !== false
    return { ack: ackEnabled }
  },
  stats: async () => ({ ...stats }),
  exit: async () => null,
}

const handleLine = async (line) => {
  if (line.trim() === '') return
  let msg
  try {
    msg = JSON.parse(line)
  } catch (err) {
    writeLine({ kind: 'response', ok: false, error: `invalid JSON: ${err.message}` })
    return
  }
  const echo = msg?.reqId === undefined ? {} : { reqId: msg.reqId }
  const fn = commands[msg?.cmd]
  if (!fn) {
    writeLine({ kind: 'response', cmd: msg?.cmd, ok: false, ...echo, error: `unknown cmd ${JSON.stringify(msg?.cmd)}` })
    return
  }
  try {
    const result = await fn(msg)
    writeLine({ kind: 'response', cmd: msg.cmd, ok: true, ...echo, result })
  } catch (err) {
    writeLine({ kind: 'response', cmd: msg.cmd, ok: false, ...echo, error: errText(err), cause: errText(err?.cause) })
  }
  if (msg.cmd === 'exit') await finish(0, 'exit command')
}

let queue = Promise.resolve()
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity })
rl.on('line', (line) => {
  queue = queue.then(() => handleLine(line))
})
rl.on('close', () => {
  queue = queue.then(() => finish(0, 'stdin closed'))
})
process.on('SIGINT', () => finish(0, 'SIGINT'))
process.on('SIGTERM', () => finish(0, 'SIGTERM'))
