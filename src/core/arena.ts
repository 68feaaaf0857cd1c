/**
 * Lays the frames of successive deliveries back to back in shared slabs, so a
 * stream that receives several of them in a row can write the whole run as one
 * view of the slab: no copy and no allocation per recipient, however many
 * streams the events go to.
 *
 * A slab lives as long as any view of it: pending writes, replay buffers and
 * Node's queue of a socket. A socket already behind gets copies (see
 * StreamConnection.flush), but the one write that falls behind can still hold
 * its slab until the client reads or the socket closes: a slow stream may pin
 * one slab beyond its MAX_BUFFERED_BYTES, so slabs are sized from that bound
 * (see slabBytesFor).
 *
 * Each placed frame gets a number, `placement`; frames with consecutive
 * numbers lie back to back. Streams compare these integers per delivery
 * rather than asking each Buffer for its ArrayBuffer, which V8 answers in C++.
 */
const MIN_SLAB_BYTES = 8 * 1024
const MAX_SLAB_BYTES = 64 * 1024

/**
 * The slab size for streams that may hold `maxBufferedBytes` unsent: a
 * sixteenth of it, from 8 KB (Node's own Buffer pool, which a pooled frame
 * would pin alike) to 64 KB. A run that reaches a slab's end is written as a
 * concatenated copy; in a burst to 10k streams, 8 KB slabs made that about
 * every other write, and the copies' garbage doubled S2's p99 (bench/README.md).
 */
export function slabBytesFor (maxBufferedBytes: number): number {
  return Math.min(MAX_SLAB_BYTES, Math.max(MIN_SLAB_BYTES, Math.floor(maxBufferedBytes / 16)))
}

/** Frames from elsewhere carry this placement: nothing ever follows it. */
export const NOT_PLACED = -2

// Numbers are unique in the process, across arenas, so no two frames anywhere
// can pass for neighbours unless they are.
let lastNumberGiven = 0

export class FrameArena {
  private slab: Buffer
  private used = 0
  private lastSource: Buffer | null = null
  private lastPlaced: Buffer | null = null
  private lastPlacement = NOT_PLACED
  /** Whether the next frame that fits goes right after the last one placed. */
  private slabContinues = false

  constructor (private readonly slabBytes = MIN_SLAB_BYTES) {
    this.slab = Buffer.allocUnsafeSlow(slabBytes)
  }

  /** The number of the frame `place` returned last (see the class comment). */
  get placement (): number {
    return this.lastPlacement
  }

  /** The frame's bytes, right after those placed before when they fit. */
  place (frame: Buffer): Buffer {
    // One event goes to several channels in a row (users, members): place it once.
    if (frame === this.lastSource && this.lastPlaced !== null) return this.lastPlaced
    let placed = frame
    if (frame.length > this.slabBytes >> 2) {
      // Left where it is: nothing lies after it in a slab.
      this.slabContinues = false
      this.number(false)
    } else {
      if (this.used + frame.length > this.slabBytes) {
        this.slab = Buffer.allocUnsafeSlow(this.slabBytes)
        this.used = 0
        this.slabContinues = false
      }
      placed = this.slab.subarray(this.used, this.used + frame.length)
      frame.copy(placed)
      this.used += frame.length
      this.number(this.slabContinues)
      this.slabContinues = true
    }
    this.lastSource = frame
    this.lastPlaced = placed
    return placed
  }

  private number (followsLast: boolean): void {
    const follows = followsLast && this.lastPlacement === lastNumberGiven
    lastNumberGiven += follows ? 1 : 2
    this.lastPlacement = lastNumberGiven
  }
}
