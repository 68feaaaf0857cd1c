/**
 * Lays the frames of successive deliveries back to back in shared slabs, so a
 * stream that receives several of them in a row can write the whole run as one
 * view of the slab: no copy and no allocation per recipient, however many
 * streams the events go to.
 *
 * A slab lives as long as any view of it: pending writes, replay buffers and
 * Node's queue of a socket. A socket already behind gets copies (see
 * StreamConnection.flush), but the one write that falls behind can still hold
 * its slab until the client reads or the socket closes; slabs are therefore
 * the size of Node's own Buffer pool (8 KB), which a pooled frame would hold
 * in the same place.
 */
export class FrameArena {
  private slab: Buffer
  private used = 0
  private lastSource: Buffer | null = null
  private lastPlaced: Buffer | null = null

  constructor (private readonly slabBytes = 8 * 1024) {
    this.slab = Buffer.allocUnsafeSlow(slabBytes)
  }

  /** The frame's bytes, right after those placed before when they fit. */
  place (frame: Buffer): Buffer {
    // One event goes to several channels in a row (users, members): place it once.
    if (frame === this.lastSource && this.lastPlaced !== null) return this.lastPlaced
    if (frame.length > this.slabBytes >> 2) return frame
    if (this.used + frame.length > this.slabBytes) {
      this.slab = Buffer.allocUnsafeSlow(this.slabBytes)
      this.used = 0
    }
    const placed = this.slab.subarray(this.used, this.used + frame.length)
    frame.copy(placed)
    this.used += frame.length
    this.lastSource = frame
    this.lastPlaced = placed
    return placed
  }
}
