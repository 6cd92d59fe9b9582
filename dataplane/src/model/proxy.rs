//! Local answers: ARP requests and neighbour solicitations for known
//! addresses are answered back to the asking port.
use cloison_abi::{
    DropReason::{self, *},
    PortInfo,
};

use super::{
    parse::{be16, mac, v4_mapped},
    Model, Verdict,
};

impl Model<'_> {
    /// An ARP request (sender fields already checked) answered, or why not.
    pub(super) fn arp(&self, f: &[u8], port: &PortInfo) -> Result<Verdict, DropReason> {
        let (spa, tpa) = (&f[28..32], &f[38..42]);
        match be16(f, 20) {
            1 => {}
            2 => return Err(ArpReplyFromVm),
            _ => return Err(MalformedArp),
        }
        if tpa == spa {
            return Err(ArpSelfTarget);
        }
        let m = self
            .neighbour(port.vni, v4_mapped(tpa))
            .ok_or(ArpUnknownTarget)?;
        if m == mac(f, 6) {
            return Err(ArpSelfTarget);
        }
        Ok(Verdict::Back)
    }

    pub(super) fn nd(&self, f: &[u8], port: &PortInfo) -> Result<Verdict, DropReason> {
        if f.len() < 54 + 24 {
            return Err(NdMalformed);
        }
        if (be16(f, 18) as usize) < 24 || f[21] != 255 || f[55] != 0 {
            return Err(NdMalformed);
        }
        if f[22..38] == [0; 16] {
            return Err(NdDadProbe);
        }
        let target: [u8; 16] = f[62..78].try_into().expect("16 bytes");
        self.neighbour(port.vni, target).ok_or(NdUnknownTarget)?;
        Ok(Verdict::Back)
    }
}
