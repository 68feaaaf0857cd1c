/**
 * Channel names. Every published event goes to one or more channels; a stream
 * listens to a set of channels; history is kept per channel. The prefix before
 * the first ':' says what kind of channel it is.
 */
export const channel = {
  user: (userId: string) => `u:${userId}`,
  connection: (connectionId: string) => `c:${connectionId}`,
  topic: (topic: string) => `t:${topic}`,
  // The owner is part of the name: a job id reused by another owner once the
  // first job expired is another channel, so the first owner's open stream
  // hears nothing of it. Job ids cannot hold '/', so the name is unambiguous.
  job: (jobId: string, ownerId: string) => `j:${jobId}/${ownerId}`,
  userJobs: (userId: string) => `uj:${userId}`,
  broadcast: 'b'
} as const
