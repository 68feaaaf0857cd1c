import type { EventBus } from './bus'
import { FrameArena } from './arena'
import type { StreamConnection } from './connection'
import { Groups } from './groups'

/**
 * Local fan-out: which of this process's streams listen to which channel. The
 * bus is asked to listen to a channel when its first local stream joins and to
 * stop when the last one leaves, so an instance receives only the traffic its
 * own streams need.
 */
export class Hub {
  private readonly members = new Groups<StreamConnection>()
  private readonly listening = new Map<string, Promise<void>>()
  private readonly arena: FrameArena

  /** `slabBytes`: see slabBytesFor. */
  constructor (private readonly bus: EventBus, slabBytes?: number) {
    this.arena = new FrameArena(slabBytes)
    bus.onDelivery((name, id, frame) => {
      const members = this.members.lookup(name)
      if (members === undefined) return
      const placed = this.arena.place(frame)
      const placement = this.arena.placement
      if (members instanceof Set) {
        for (const connection of members) connection.deliver(id, placed, placement)
      } else {
        members.deliver(id, placed, placement)
      }
    })
  }

  /** Resolves when every event published to these channels from now on will reach the connection. */
  async join (connection: StreamConnection, channels: Iterable<string>): Promise<void> {
    const waits: Array<Promise<void>> = []
    for (const name of channels) {
      if (connection.closed || !connection.addChannel(name)) continue
      if (!this.members.has(name)) {
        const listening = this.bus.listen(name)
        this.listening.set(name, listening)
        // Settled promises are not kept: the map holds only subscriptions in flight.
        listening.then(() => {
          if (this.listening.get(name) === listening) this.listening.delete(name)
        }, () => {
          if (this.listening.get(name) === listening) this.listening.delete(name)
        })
      }
      this.members.add(name, connection)
      const pending = this.listening.get(name)
      if (pending !== undefined) waits.push(pending)
    }
    await Promise.all(waits)
  }

  leave (connection: StreamConnection, channels: Iterable<string>): void {
    for (const name of channels) {
      if (!connection.removeChannel(name)) continue
      this.members.delete(name, connection)
      if (!this.members.has(name)) {
        this.listening.delete(name)
        this.bus.unlisten(name)
      }
    }
  }

  leaveAll (connection: StreamConnection): void {
    this.leave(connection, [...connection.channels])
  }

  channelCount (): number {
    return this.members.size
  }

  listeners (name: string): number {
    return this.members.count(name)
  }
}
