/**
 * The bench's load client counts completeness, order and latency with this
 * parser, so its figures are only as right as it is.
 */
import t from 'tap'
import { StreamReader, type ReaderTotals } from '../bench/lib/sse-reader'
import { Histogram } from '../bench/lib/histogram'
import { chunkOfText, frameWithId, renderBody, retryFrame, systemFrame } from '../src/core/framing'

function totals (): ReaderTotals {
  return { events: 0, firstRxUs: 0, lastRxUs: 0, outOfOrder: 0, gaps: 0, latency: new Histogram() }
}

const HEAD = Buffer.from('HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n')

function event (seq: number, t = 1000 + seq): Buffer {
  return frameWithId(seq + 1, renderBody('bench', JSON.stringify({ t, seq })))
}

/** A stream as the gateway writes it: head, retry, connected, then one chunk per event (several per write). */
function gatewayBytes (seqs: number[]): Buffer {
  return Buffer.concat([HEAD, retryFrame(3000), systemFrame('connected', { connectionId: 'c1' }), ...seqs.map((seq) => event(seq)), chunkOfText(': keepalive\n\n')])
}

function feedInPieces (reader: StreamReader, bytes: Buffer, cuts: number[]): void {
  let from = 0
  for (const cut of [...cuts, bytes.length]) {
    // Each read arrives in a reused buffer: copy, then scribble over it after.
    const read = Buffer.from(bytes.subarray(from, cut))
    reader.feed(read, 5000)
    read.fill(0x7b)
    from = cut
  }
}

t.test('every split of a chunked SSE stream gives the same counts: events, order, gaps, latency', async (t) => {
  const seqs = [0, 1, 2, 3, 4, 5]
  const bytes = gatewayBytes(seqs)
  for (let cut = 1; cut < bytes.length; cut++) {
    const sums = totals()
    const reader = new StreamReader(sums)
    feedInPieces(reader, bytes, [cut, Math.min(bytes.length, cut + 7)].filter((at, index, all) => index === 0 || at > all[index - 1]))
    if (reader.status !== 200 || !reader.connected || reader.events !== 6 || reader.outOfOrder !== 0 || reader.gaps !== 0 || sums.latency.count !== 6 || reader.lastSeq !== 5) {
      t.fail(`split at ${cut}: status ${reader.status}, connected ${reader.connected}, events ${reader.events}, out of order ${reader.outOfOrder}, gaps ${reader.gaps}, last seq ${reader.lastSeq}`)
      return
    }
  }
  t.pass(`${bytes.length - 1} splits all read 6 events in order`)
  const sums = totals()
  const reader = new StreamReader(sums)
  reader.feed(bytes, 5000)
  const median = sums.latency.quantile(0.5) ?? 0
  t.ok(Math.abs(median - 3998) < 3998 * 0.02, `latency is read time minus the payload's t (median ${median} µs, expected ≈ 3998)`)
})

t.test('missing, reordered and repeated events are counted as gaps and out of order', async (t) => {
  const sums = totals()
  const reader = new StreamReader(sums)
  reader.feed(gatewayBytes([0, 1, 4, 3, 5, 5, 9]), 5000)
  t.equal(reader.events, 7)
  t.equal(reader.gaps, 2 + 3, '2 and 3 missing after 1, then 6-8 after 5')
  t.equal(reader.outOfOrder, 2, '3 after 4, and 5 twice')
  t.equal(sums.gaps, reader.gaps)
  t.equal(sums.outOfOrder, 2)
})

t.test('a body that is not chunked (the baseline may write either) and multi-line events count the same', async (t) => {
  const sums = totals()
  const reader = new StreamReader(sums)
  const body = ['retry: 3000\n\n', 'event: connected\ndata: {}\n\n', ...[0, 1, 2].map((seq) => `id: ${seq}\nevent: bench\ndata: {"t":1,"seq":${seq}}\n\n`)].join('')
  reader.feed(Buffer.from('HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n'), 10)
  for (let at = 0; at < body.length; at += 5) reader.feed(Buffer.from(body.slice(at, at + 5)), 10)
  t.equal(reader.events, 3)
  t.equal(reader.lastSeq, 2)
  t.equal(reader.gaps + reader.outOfOrder, 0)
  t.ok(reader.connected)
})

t.test('a stream is open when its server\'s ready marker arrives: Nchan greets with a comment, not `connected`', async (t) => {
  // Nchan's head as it sends it: no transfer coding, the body runs until the connection closes.
  const nchanHead = Buffer.from('HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: text/event-stream; charset=utf-8\r\nConnection: keep-alive\r\n\r\n')
  const greeting = Buffer.from(': hi\n\n')
  const nchan = new StreamReader(totals(), Buffer.from(': hi\n'))
  nchan.feed(nchanHead, 10)
  t.notOk(nchan.connected, 'not open on the head alone')
  nchan.feed(greeting, 10)
  t.ok(nchan.connected, 'open on Nchan\'s greeting')
  const events = 'event: bench\nid: 1796283158:0\ndata: {"t":1,"seq":1}\n\nevent: bench\nid: 1796283158:1\ndata: {"t":1,"seq":2}\n\n'
  for (let at = 0; at < events.length; at += 7) nchan.feed(Buffer.from(events.slice(at, at + 7)), 10)
  t.equal(nchan.events, 2, 'its events count like the gateway\'s, however the reads split them')
  t.equal(nchan.gaps + nchan.outOfOrder, 0)

  const gatewayReader = new StreamReader(totals())
  gatewayReader.feed(Buffer.concat([nchanHead, greeting]), 10)
  t.notOk(gatewayReader.connected, 'a reader waiting for the gateway\'s `connected` is not fooled by a comment')
})
