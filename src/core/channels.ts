/**
 * Channel names. Every published event goes to one or more channels; a stream
 * listens to a set of channels; history is kept per channel. The prefix before
 * the first ':' says what kind of channel it is.
 */
export const channel = {
  user: (userId: string) => `u:${userId}`,
  connection: (connectionId: string) => `c:${connectionId}`,
  topic: (topic: string) => `t:${topic}`,
  job: (jobId: string) => `j:${jobId}`,
  userJobs: (userId: string) => `uj:${userId}`,
  broadcast: 'b'
} as const

export type TargetKind = 'user' | 'users' | 'connection' | 'conversation' | 'topic' | 'broadcast' | 'job'

export function isTopicChannel (name: string): boolean {
  return name.startsWith('t:')
}
