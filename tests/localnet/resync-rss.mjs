// Benchmark harness (not a test): serves one repo CAR as a PDS + PLC stand-in on loopback,
// then, once told tap's URL, consumes /channel (acking everything), adds the repo and
// waits for all its records. Used by scripts/bench-resync-rss.sh.
//
//   node resync-rss.mjs serve CAR DID DIDKEY     -> prints "PORT <n>", keeps serving
//   node resync-rss.mjs consume TAP_URL DID N    -> prints "DONE <records> <seconds>"
import fs from 'node:fs'
import http from 'node:http'
import WebSocket from 'ws'

const [mode, ...args] = process.argv.slice(2)

if (mode === 'serve') {
  const [car, did, didKey] = args
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x')
    const port = server.address().port
    if (url.pathname === '/xrpc/com.atproto.sync.getRepo') {
      res.writeHead(200, { 'content-type': 'application/vnd.ipld.car' })
      fs.createReadStream(car).pipe(res)
    } else if (url.pathname === '/xrpc/com.atproto.identity.resolveHandle') {
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end(JSON.stringify({ did }))
    } else if (url.pathname === `/${did}`) {
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end(JSON.stringify({
        id: did,
        alsoKnownAs: ['at://big.test'],
        verificationMethod: [{ id: `${did}#atproto`, type: 'Multikey', controller: did,
          publicKeyMultibase: didKey.replace('did:key:', '') }],
        service: [{ id: '#atproto_pds', type: 'AtprotoPersonalDataServer',
          serviceEndpoint: `http://127.0.0.1:${port}` }],
      }))
    } else {
      res.writeHead(404).end()
    }
  })
  server.listen(0, '127.0.0.1', () => console.log(`PORT ${server.address().port}`))
} else if (mode === 'consume') {
  const [tapUrl, did, n] = args
  const want = Number(n)
  let records = 0
  const ws = new WebSocket(tapUrl.replace('http', 'ws') + '/channel')
  ws.on('open', async () => {
    const start = performance.now()
    ws.on('message', (data) => {
      const ev = JSON.parse(data.toString())
      if (ev.type === 'record') records++
      ws.send(JSON.stringify({ type: 'ack', id: ev.id }))
      if (records === want) {
        console.log(`DONE ${records} ${((performance.now() - start) / 1000).toFixed(2)}`)
        process.exit(0)
      }
    })
    const r = await fetch(`${tapUrl}/repos/add`, { method: 'POST',
      headers: { 'content-type': 'application/json' }, body: JSON.stringify({ dids: [did] }) })
    if (!r.ok) { console.error('add failed', r.status); process.exit(1) }
  })
} else {
  console.error('usage: resync-rss.mjs serve CAR DID DIDKEY | consume TAP_URL DID N')
  process.exit(2)
}
