//! Forwarding by (VNI, destination MAC): a local port, or a remote VTEP.
use cloison_abi::{
    DropReason::{self, *},
    *,
};

use super::{parse::mac, Model};

impl Model<'_> {
    /// Where a frame from port `ifindex` (not its own) goes.
    pub(super) fn forward_from(
        &self,
        f: &[u8],
        ifindex: u32,
        port: &PortInfo,
    ) -> Result<ForwardEntry, DropReason> {
        let dst = mac(f, 0);
        if dst[0] & 1 == 1 {
            return Err(if dst == [0xff; 6] {
                Broadcast
            } else {
                Multicast
            });
        }
        let fwd = self.forward(port.vni, dst).ok_or(UnknownUnicast)?;
        if fwd.kind == FWD_LOCAL && fwd.ifindex == ifindex {
            return Err(Hairpin);
        }
        Ok(fwd)
    }
}
