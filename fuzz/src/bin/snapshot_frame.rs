//! The snapshot file reader (`chatd_codec::frame`, used by raftlog to install a snapshot a
//! peer sent): a whole file of `[u32 LE length][codec]` frames. It may refuse the bytes with
//! a typed error; it must not panic, and the frames it returns re-encode to the same file.

use chatd_codec::frame::{read_all_frames, write_frame, SnapshotFrame, SNAPSHOT_FRAME_BYTES_MAX};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(frames) = read_all_frames::<SnapshotFrame>(data, SNAPSHOT_FRAME_BYTES_MAX) else {
            return;
        };
        let mut out = Vec::new();
        for f in &frames {
            write_frame(&mut out, f, SNAPSHOT_FRAME_BYTES_MAX).expect("a read frame writes");
        }
        let again: Vec<SnapshotFrame> =
            read_all_frames(&out, SNAPSHOT_FRAME_BYTES_MAX).expect("a written file reads");
        assert_eq!(again, frames);
    });
}
