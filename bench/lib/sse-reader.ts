/**
 * The load client's parser: the HTTP/1.1 response head, chunked transfer
 * coding, and just enough SSE to count events. It does not build event objects:
 * per read it finds complete events (up to the last blank line), and within them
 * the publisher's `{"t":<µs>,"seq":<n>}` payloads, which give order, gaps and
 * publish-to-receive latency. Both servers under test frame events with LF.
 */
import type { Histogram } from './histogram'

const HEAD_END = Buffer.from('\r\n\r\n')
const SEQ = Buffer.from(',"seq":')
const GATEWAY_READY = Buffer.from('event: connected\n')

const enum Chunk { Size, Data, DataEnd }

/** Totals shared by every reader of one worker. */
export interface ReaderTotals {
  events: number
  firstRxUs: number
  lastRxUs: number
  outOfOrder: number
  gaps: number
  latency: Histogram
}

export class StreamReader {
  /** HTTP status, 0 until the head has arrived. */
  status = 0
  /** Set once the server's ready marker arrived (the stream is open end to end). */
  connected = false
  /** True after the terminating zero-size chunk. */
  ended = false
  events = 0
  /** Last `seq` seen, or -1 before the first. */
  lastSeq = -1
  outOfOrder = 0
  gaps = 0

  private head: Buffer | null = null
  private chunked = false
  private chunkState = Chunk.Size
  private chunkLeft = 0
  private sizeValue = 0
  private sizeDigits = true
  private carry: Buffer | null = null

  /** `readyMarker`: the bytes that say the stream is open end to end, shared by every reader of a plan. */
  constructor (private readonly totals: ReaderTotals, private readonly readyMarker: Buffer = GATEWAY_READY) {}

  /** Forgets counts (not the connection state), at the start of a measured phase. */
  resetCounts (): void {
    this.events = 0
    this.lastSeq = -1
    this.outOfOrder = 0
    this.gaps = 0
  }

  /**
   * Feeds bytes as read from the socket; `rxUs` is the time they were read.
   * Nothing of `chunk` is kept after the call, so the caller may reuse it.
   */
  feed (chunk: Buffer, rxUs: number): void {
    if (this.status === 0) {
      const joined = this.head === null ? chunk : Buffer.concat([this.head, chunk])
      const end = joined.indexOf(HEAD_END)
      if (end < 0) {
        // Copied: the caller may reuse its read buffer.
        this.head = Buffer.from(joined)
        return
      }
      this.head = null
      this.parseHead(joined.toString('latin1', 0, end))
      chunk = joined.subarray(end + 4)
      if (chunk.length === 0) return
    }
    if (!this.chunked) {
      this.body(chunk, 0, chunk.length, rxUs)
      return
    }
    this.dechunk(chunk, rxUs)
  }

  private parseHead (head: string): void {
    const match = /^HTTP\/1\.[01] (\d{3})/.exec(head)
    this.status = match === null ? 599 : Number(match[1])
    this.chunked = /\r\ntransfer-encoding:\s*chunked/i.test(head)
  }

  private dechunk (data: Buffer, rxUs: number): void {
    let pos = 0
    const length = data.length
    while (pos < length) {
      switch (this.chunkState) {
        case Chunk.Size: {
          // Hex digits, optional extensions, CRLF.
          while (pos < length) {
            const byte = data[pos++]
            if (byte === 0x0a) {
              if (this.sizeValue === 0) {
                this.ended = true
                return
              }
              this.chunkLeft = this.sizeValue
              this.sizeValue = 0
              this.sizeDigits = true
              this.chunkState = Chunk.Data
              break
            }
            if (!this.sizeDigits) continue
            const digit = byte >= 0x30 && byte <= 0x39 ? byte - 0x30 : byte >= 0x61 && byte <= 0x66 ? byte - 87 : byte >= 0x41 && byte <= 0x46 ? byte - 55 : -1
            if (digit < 0) this.sizeDigits = false
            else this.sizeValue = this.sizeValue * 16 + digit
          }
          break
        }
        case Chunk.Data: {
          const take = Math.min(this.chunkLeft, length - pos)
          this.body(data, pos, pos + take, rxUs)
          pos += take
          this.chunkLeft -= take
          if (this.chunkLeft === 0) {
            this.chunkState = Chunk.DataEnd
            this.chunkLeft = 2
          }
          break
        }
        case Chunk.DataEnd: {
          const take = Math.min(this.chunkLeft, length - pos)
          pos += take
          this.chunkLeft -= take
          if (this.chunkLeft === 0) this.chunkState = Chunk.Size
          break
        }
      }
    }
  }

  /**
   * SSE bytes `data[from, to)`: only complete events (up to the last blank
   * line) are looked at. Offsets rather than views, and byte loops rather than
   * `indexOf`: a server writes one HTTP chunk per event, so this runs once per
   * event, and a native call or a view per event would cost the client more
   * than the server spends delivering it.
   */
  private body (data: Buffer, from: number, to: number, rxUs: number): void {
    let buffer = data
    let start = from
    let stop = to
    if (this.carry !== null) {
      buffer = Buffer.concat([this.carry, data.subarray(from, to)])
      this.carry = null
      start = 0
      stop = buffer.length
    }
    let last = stop - 2
    while (last >= start && !(buffer[last] === 0x0a && buffer[last + 1] === 0x0a)) last--
    if (last < start) {
      this.carry = Buffer.from(buffer.subarray(start, stop))
      return
    }
    const end = last + 2
    if (end < stop) this.carry = Buffer.from(buffer.subarray(end, stop))
    if (!this.connected) {
      const at = buffer.indexOf(this.readyMarker, start)
      if (at >= 0 && at < end) this.connected = true
    }
    const totals = this.totals
    let found = 0
    // Payloads are `{"t":<digits>` with an optional `,"seq":<digits>` after.
    for (let p = start; p + 5 <= end; p++) {
      if (buffer[p] !== 0x7b || buffer[p + 1] !== 0x22 || buffer[p + 2] !== 0x74 || buffer[p + 3] !== 0x22 || buffer[p + 4] !== 0x3a) continue
      p += 5
      let t = 0
      let byte = buffer[p]
      while (byte >= 0x30 && byte <= 0x39) {
        t = t * 10 + (byte - 0x30)
        byte = buffer[++p]
      }
      let seq = -1
      if (p + SEQ.length <= end && matchesAt(buffer, p, SEQ)) {
        p += SEQ.length
        seq = 0
        byte = buffer[p]
        while (byte >= 0x30 && byte <= 0x39) {
          seq = seq * 10 + (byte - 0x30)
          byte = buffer[++p]
        }
      }
      found++
      totals.latency.record(rxUs - t)
      if (seq >= 0) {
        const previous = this.lastSeq
        if (previous >= 0) {
          if (seq <= previous) {
            this.outOfOrder++
            totals.outOfOrder++
          } else if (seq > previous + 1) {
            this.gaps += seq - previous - 1
            totals.gaps += seq - previous - 1
          }
        }
        if (seq > previous) this.lastSeq = seq
      }
    }
    if (found > 0) {
      this.events += found
      totals.events += found
      if (totals.firstRxUs === 0) totals.firstRxUs = rxUs
      totals.lastRxUs = rxUs
    }
  }
}

function matchesAt (buffer: Buffer, at: number, expected: Buffer): boolean {
  for (let index = 0; index < expected.length; index++) {
    if (buffer[at + index] !== expected[index]) return false
  }
  return true
}
